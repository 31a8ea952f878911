//! What both programs (simplevpnd and simplevpn-helper) do at their edges:
//! parse the command line the same way, and log the same way.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

/// Exit code for bad flags or config, as for clap's own usage errors.
pub const EXIT_USAGE: u8 = 2;

/// The parsed command line; or, for a bad one, the exit code after printing
/// its first line to stderr (`--help` and `--version` print in full and
/// exit 0).
pub fn parse_args<T: Parser>() -> Result<T, ExitCode> {
    match T::try_parse() {
        Ok(args) => Ok(args),
        Err(e) if e.use_stderr() => {
            let rendered = e.render().to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or("bad arguments"));
            Err(ExitCode::from(EXIT_USAGE))
        }
        Err(e) => {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
    }
}

/// Installs the global `tracing` subscriber: one line per event on stderr,
/// `RUST_LOG` filtering (default `info`), colours only on a terminal. Call
/// once, early in `main`. A `RUST_LOG` that does not parse logs at `info`.
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    tracing_subscriber::fmt()
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .with(log_filter())
        .init();
}

/// `RUST_LOG` with the full `EnvFilter` syntax (span and field directives,
/// regular expressions).
#[cfg(feature = "env-filter")]
fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// `RUST_LOG` as levels and `target=level` directives only: `EnvFilter`
/// brings a regular expression engine, over 300 KiB in each of the
/// client-only build's daemon and helper.
#[cfg(not(feature = "env-filter"))]
fn log_filter() -> tracing_subscriber::filter::Targets {
    targets(std::env::var("RUST_LOG").ok().as_deref())
}

/// The filter for a `RUST_LOG` value: `info` when unset, empty or not
/// parseable.
#[cfg(not(feature = "env-filter"))]
fn targets(spec: Option<&str>) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::Targets;

    spec.filter(|spec| !spec.trim().is_empty())
        .and_then(|spec| spec.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO))
}

#[cfg(all(test, not(feature = "env-filter")))]
mod tests {
    use tracing::Level;

    use super::targets;

    #[test]
    fn unset_empty_or_unparseable_rust_log_is_info() {
        for spec in [
            None,
            Some(""),
            Some("  "),
            Some("[span{x=1}]=debug"),
            Some("a=loud"),
        ] {
            let filter = targets(spec);
            assert!(
                filter.would_enable("simplevpn::client", &Level::INFO),
                "{spec:?}"
            );
            assert!(
                !filter.would_enable("simplevpn::client", &Level::DEBUG),
                "{spec:?}"
            );
        }
    }

    #[test]
    fn levels_and_target_directives_work() {
        let filter = targets(Some("debug"));
        assert!(filter.would_enable("anything", &Level::DEBUG));
        assert!(!filter.would_enable("anything", &Level::TRACE));

        let filter = targets(Some("warn,simplevpn::client=trace"));
        assert!(filter.would_enable("simplevpn::client::tls", &Level::TRACE));
        assert!(!filter.would_enable("simplevpn::daemon", &Level::INFO));
        assert!(filter.would_enable("simplevpn::daemon", &Level::WARN));

        let filter = targets(Some("off"));
        assert!(!filter.would_enable("simplevpn", &Level::ERROR));
    }
}
