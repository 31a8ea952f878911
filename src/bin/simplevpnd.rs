//! simplevpnd: parses the command line, starts simplevpn-helper and drops to
//! the service user (while still single-threaded, before any network I/O),
//! then sets up signals and hands over to `simplevpn::daemon::run`.

use std::process::ExitCode;
use std::time::Duration;

use std::io::Read;
use std::path::Path;

use simplevpn::daemon::check;
use simplevpn::daemon::cli::{Action, Cli};
use simplevpn::daemon::control::{self, ControlSocketError};
use simplevpn::daemon::helper::Helper;
use simplevpn::daemon::privileges::{self, HelperProcess};
use simplevpn::daemon::Role;
use simplevpn::keys::NodeKey;
use simplevpn::privsep::credentials::ServiceUser;
use simplevpn::program::{self, EXIT_USAGE};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How long the helper has to exit (and take the tun with it) after the
/// daemon closes its socket.
const HELPER_EXIT_TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = match program::parse_args::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let explicit = cli.config.clone();
    let file = simplevpn::config::config_path(explicit.as_deref()).map(Path::to_path_buf);
    let settings = match cli.into_action() {
        Ok(Action::Run(settings)) => *settings,
        Ok(Action::Check(settings, _)) => return run_check(&settings, file.as_deref()),
        Ok(Action::Keygen(path)) => return keygen(&path),
        Ok(Action::Pubkey(path)) => return pubkey(&path),
        Ok(Action::Join(options)) => return join(&options),
        Err(e) => {
            let text = file
                .as_deref()
                .and_then(|f| std::fs::read_to_string(f).ok());
            eprintln!(
                "simplevpnd: {}",
                check::locate(&e, file.as_deref(), text.as_deref())
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Both users must exist before anything starts: never a silent
    // fallback to the daemon's own user for the helper.
    let (user, helper_user) =
        match ServiceUser::daemon_and_helper(settings.role.user(), settings.role.helper_user()) {
            Ok(users) => users,
            Err(e) => {
                eprintln!("simplevpnd: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
    if let Err(e) = privileges::require_root(&user) {
        eprintln!("simplevpnd: {e}");
        return ExitCode::FAILURE;
    }
    // As root: the key file is readable by root alone.
    let key = match settings.role.load_key().transpose() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("simplevpnd: key: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // A cluster server's own [[cluster.member]] entry pins the key it
    // serves (and signs its records) with.
    if let Role::Server(config) = &settings.role {
        if let Some(cluster) = &config.cluster {
            if let Err(e) = cluster.check_own_key(key.as_ref().map(NodeKey::public)) {
                eprintln!("simplevpnd: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    program::init_logging();
    raise_open_file_limit();

    // As root, so the socket can get its group whoever the service user is.
    let control = match control::open(&settings.control, user.uid.as_raw()) {
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

    // As root: the state directory becomes the service user's.
    if let Role::Server(config) = &settings.role {
        if let Err(e) = privileges::take_state_dir(&config.state_dir, &user) {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    }

    // Still one thread: the helper starts as root, then this process gives
    // up root and every capability for good.
    let HelperProcess { child, socket } = match privileges::start(&settings.role, &user) {
        Ok(helper) => helper,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    info!(
        user = %user.name,
        helper_pid = child.id(),
        helper_user = %helper_user.name,
        "running as {} without capabilities; simplevpn-helper runs as {} and keeps CAP_NET_ADMIN",
        user.name,
        helper_user.name
    );

    // One thread; a server with more than one worker starts its worker
    // threads itself (see workers.rs).
    let code = match simplevpn::workers::runtime() {
        Ok(runtime) => {
            let code = runtime.block_on(async {
                let helper = match Helper::new(socket) {
                    Ok(helper) => helper,
                    Err(e) => {
                        error!("cannot watch simplevpn-helper's socket: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let shutdown = CancellationToken::new();
                tokio::spawn(stop_on_signal(shutdown.clone()));
                let run = simplevpn::daemon::run(
                    settings.role,
                    settings.source,
                    helper,
                    Some(control),
                    key,
                    shutdown,
                );
                match run.await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        error!("{e}");
                        ExitCode::FAILURE
                    }
                }
            });
            // Closes the helper's socket (and this process's tun fd) even if
            // a blocking task is still running.
            runtime.shutdown_timeout(Duration::from_secs(1));
            code
        }
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    };
    match privileges::reap(child, HELPER_EXIT_TIMEOUT) {
        Some(status) if status.success() => {}
        Some(status) => warn!("simplevpn-helper exited: {status}"),
        None => warn!("simplevpn-helper could not be reaped"),
    }
    code
}

/// Every client is a socket: raise the soft limit on open files to the hard
/// one (systemd and shells start at 1024), while still root.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => warn!("cannot read the open-file limit: {e}"),
    }
}

/// Prints the public key of a key just made or read.
/// `simplevpnd keygen PATH`: the public key on stdout; with "-", the
/// private key on stdout and the public key on stderr.
fn keygen(path: &Path) -> ExitCode {
    if path != Path::new("-") {
        return print_public_key(NodeKey::generate(path));
    }
    match NodeKey::new_random() {
        Ok(key) => {
            print!("{}", key.to_pem());
            eprintln!("{}", key.public());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("simplevpnd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `simplevpnd pubkey PATH` ("-": standard input).
fn pubkey(path: &Path) -> ExitCode {
    if path != Path::new("-") {
        return print_public_key(NodeKey::load(path));
    }
    let mut pem = String::new();
    // A key file is a few hundred bytes: read at most 64 KiB.
    if let Err(e) = std::io::stdin().take(65_536).read_to_string(&mut pem) {
        eprintln!("simplevpnd: standard input: {e}");
        return ExitCode::FAILURE;
    }
    print_public_key(NodeKey::from_pem(&pem, Path::new("standard input")))
}

/// `simplevpnd join TOKEN`: exit 0 with the next command, 1 when
/// refused or unreachable, 2 for a bad token or a file in the way.
fn join(options: &simplevpn::daemon::join::JoinOptions) -> ExitCode {
    use simplevpn::daemon::join::JoinFailure;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("simplevpnd: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(simplevpn::daemon::join::join(options)) {
        Ok(joined) => {
            if joined.made_key {
                println!(
                    "made this host's key {} ({})",
                    options.key.display(),
                    joined.key.public()
                );
            }
            let start = match options.config_out == Path::new("/etc/simplevpn/simplevpnd.toml") {
                true => "sudo systemctl enable --now simplevpnd".to_string(),
                false => format!("sudo simplevpnd --config {}", options.config_out.display()),
            };
            let address = joined
                .accepted
                .address
                .map_or(String::new(), |a| format!(", address {a}"));
            println!(
                "joined as {}{address}; wrote {}. Start it: {start}",
                joined.accepted.name,
                options.config_out.display()
            );
            ExitCode::SUCCESS
        }
        Err(JoinFailure::Usage(e)) => {
            eprintln!("simplevpnd: join: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(JoinFailure::Failed(e)) => {
            eprintln!("simplevpnd: join: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `simplevpnd check`: exit 0 with the summary, or 2 with each problem.
fn run_check(settings: &simplevpn::daemon::Settings, file: Option<&Path>) -> ExitCode {
    let report = check::check(&settings.role, file, check::Host::current());
    for warning in &report.warnings {
        eprintln!("simplevpnd: warning: {warning}");
    }
    for problem in &report.problems {
        eprintln!("simplevpnd: {problem}");
    }
    match report.problems.is_empty() {
        true => {
            let from = file.map_or("flags only".to_string(), |f| f.display().to_string());
            println!("ok: {} ({from})", report.summary);
            ExitCode::SUCCESS
        }
        false => ExitCode::from(EXIT_USAGE),
    }
}

fn print_public_key(key: Result<NodeKey, simplevpn::keys::KeyError>) -> ExitCode {
    match key {
        Ok(key) => {
            println!("{}", key.public());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("simplevpnd: {e}");
            ExitCode::FAILURE
        }
    }
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
