use crate::test_support::filter;
