fn main() -> std::process::ExitCode {
    moeq::cli::main()
}
