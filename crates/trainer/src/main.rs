//! `trainer` binary: front end to the `trainer` library.

fn main() {
    println!("{}", trainer::status());
}
