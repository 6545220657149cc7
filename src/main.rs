use clap::Parser;

fn main() {
    let cli = match raftgen::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, as for every other error: the first line of clap's
            // message, with the missing argument folded in.
            let text = e.render().to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let first = lines.next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            let detail = if first.ends_with(':') { lines.next() } else { None };
            let message = [Some(first), detail].into_iter().flatten().collect::<Vec<_>>().join(" ");
            eprintln!("error: {message} (see raftgen --help)");
            std::process::exit(2);
        }
    };
    raftgen::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(raftgen::cli::run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
