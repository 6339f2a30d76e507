//! How results are printed: a plain aligned table for people, JSON for scripts.
//!
//! The table is `kubectl get`'s: upper-case headers, columns padded to their widest cell and
//! separated by three spaces, no borders, so it reads in a terminal and greps in a pipe.

use std::fmt::Write as _;

use serde::Serialize;

/// The `-o` / `--output` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Readable text: tables and messages.
    Table,
    /// JSON on stdout, one document per command.
    Json,
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `rows` under `headers`, each column as wide as its widest cell; trailing spaces trimmed.
pub fn table<const N: usize>(headers: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = headers.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: [&str; N]| {
        let mut rendered = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 < N {
                let _ = write!(rendered, "{cell:<width$}   ");
            } else {
                rendered.push_str(cell);
            }
        }
        text.push_str(rendered.trim_end());
        text.push('\n');
    };
    line(headers);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn table_pads_columns_to_their_widest_cell_and_trims_line_ends() {
        let text = table(
            ["VERSION", "ORIGIN", "NOTE"],
            &[
                [
                    "1".into(),
                    "file:/etc/fulcrum/policy.yaml".into(),
                    String::new(),
                ],
                ["12".into(), "rollback".into(), "current".into()],
            ],
        );
        assert_eq!(
            text,
            "VERSION   ORIGIN                          NOTE\n\
             1         file:/etc/fulcrum/policy.yaml\n\
             12        rollback                        current\n"
        );
    }
}
