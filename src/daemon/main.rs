//! simplevpnd: parses the command line, sets up logging and signals, and
//! hands over to `simplevpn::daemon::run`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use simplevpn::daemon::cli::Cli;
use simplevpn::daemon::control::{self, ControlSocketError};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Exit code for bad flags or config, as for clap's own usage errors.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let rendered = e.render().to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or("bad arguments"));
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let settings = match cli.into_settings() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("simplevpnd: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let control = match control::open(&settings.control, nix::unistd::geteuid().as_raw()) {
        Ok(control) => control,
        Err(e @ ControlSocketError::NoSuchGroup { .. }) => {
            eprintln!("simplevpnd: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        match simplevpn::daemon::run(settings.role, Some(control), shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!("{name} received, shutting down");
    shutdown.cancel();
}
