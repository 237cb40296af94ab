fn main() {
    eprintln!("sidekey-bench: not built yet");
}
