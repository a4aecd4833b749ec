//! The examples that check something run as tests too, so they stay true.

#[path = "../examples/partition_test.rs"]
mod partition_test;

#[test]
fn partition_test_example() {
    partition_test::main();
}
