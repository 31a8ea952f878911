//! simplevpn-gen-assets: writes the man pages and shell completions of
//! simplevpnd and svpnctl, generated from their clap definitions, into a
//! folder (default target/assets) for the packages. Not installed itself.
//!
//! ```text
//! target/assets/man/simplevpnd.8 simplevpnd-server.8 simplevpnd-client.8
//!                   svpnctl.1 svpnctl-status.1 ... svpnctl-watch.1
//! target/assets/completions/bash/simplevpnd  zsh/_simplevpnd  fish/simplevpnd.fish
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Command, CommandFactory};
use clap_complete::Shell;
use clap_mangen::Man;
use roff::{bold, italic, roman, Inline, Roff};
use simplevpn::config::{DEFAULT_CONFIG_PATH, DEFAULT_CONTROL_SOCKET};

/// One program: its command line, man section, and the sections written
/// after the generated ones on its main page.
struct Program {
    cmd: Command,
    section: &'static str,
    manual: &'static str,
    extra: Vec<Section>,
}

/// A man page section: a heading and paragraphs (tagged ones are `.TP`).
struct Section {
    heading: &'static str,
    paragraphs: Vec<Paragraph>,
}

enum Paragraph {
    Text(Vec<Inline>),
    Tagged(Vec<Inline>, Vec<Inline>),
}

fn main() -> Result<()> {
    let out = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/assets"),
    };
    if std::env::args_os().len() > 2 {
        bail!("usage: simplevpn-gen-assets [OUT_DIR]   (default: target/assets)");
    }
    for program in [simplevpnd(), svpnctl()] {
        man_pages(&program, &out.join("man"))?;
        completions(program.cmd, &out.join("completions"))?;
    }
    println!("wrote man pages and completions to {}", out.display());
    Ok(())
}

/// The main page of `program` with its extra sections, and one page per
/// subcommand (`simplevpnd-server.8`), as `clap_mangen::generate_to` names them.
fn man_pages(program: &Program, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut cmd = program.cmd.clone().disable_help_subcommand(true);
    cmd.build();
    let source = format!("simplevpn {}", env!("CARGO_PKG_VERSION"));
    let page = |cmd: Command| {
        Man::new(cmd)
            .section(program.section)
            .source(source.clone())
            .manual(program.manual)
    };

    let mut text = Vec::new();
    page(cmd.clone()).render(&mut text)?;
    let mut roff = Roff::new();
    for section in &program.extra {
        roff.control("SH", [section.heading]);
        for paragraph in &section.paragraphs {
            match paragraph {
                Paragraph::Text(inlines) => {
                    roff.control("PP", []).text(inlines.clone());
                }
                Paragraph::Tagged(tag, body) => {
                    roff.control("TP", []).text(tag.clone()).text(body.clone());
                }
            }
        }
    }
    roff.to_writer(&mut text)?;
    write(
        &dir.join(format!("{}.{}", cmd.get_name(), program.section)),
        &text,
    )?;

    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let man = page(sub.clone());
        let mut text = Vec::new();
        man.render(&mut text)?;
        write(&dir.join(man.get_filename()), &text)?;
    }
    Ok(())
}

/// Bash, zsh and fish completions for `cmd`, each in its shell's folder.
fn completions(mut cmd: Command, dir: &Path) -> Result<()> {
    let name = cmd.get_name().to_string();
    for (shell, sub) in [
        (Shell::Bash, "bash"),
        (Shell::Zsh, "zsh"),
        (Shell::Fish, "fish"),
    ] {
        let dir = dir.join(sub);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let file = clap_complete::generate_to(shell, &mut cmd, &name, &dir)
            .with_context(|| format!("write the {sub} completion of {name}"))?;
        // bash-completion looks a command up by its plain name.
        if shell == Shell::Bash {
            fs::rename(&file, dir.join(&name))
                .with_context(|| format!("rename {}", file.display()))?;
        }
    }
    Ok(())
}

fn write(path: &Path, text: &[u8]) -> Result<()> {
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

fn text(inlines: impl Into<Vec<Inline>>) -> Paragraph {
    Paragraph::Text(inlines.into())
}

fn tagged(tag: impl Into<Vec<Inline>>, body: impl Into<Vec<Inline>>) -> Paragraph {
    Paragraph::Tagged(tag.into(), body.into())
}

fn see_also(pages: &[&str]) -> Section {
    let mut inlines = Vec::new();
    for (i, page) in pages.iter().enumerate() {
        if i > 0 {
            inlines.push(roman(", "));
        }
        let (name, section) = page.split_once('(').unwrap_or((page, ""));
        inlines.push(bold(name));
        inlines.push(roman(format!("({section}")));
    }
    Section {
        heading: "SEE ALSO",
        paragraphs: vec![text(inlines)],
    }
}

fn simplevpnd() -> Program {
    Program {
        cmd: simplevpn::daemon::cli::Cli::command(),
        section: "8",
        manual: "System Administration",
        extra: vec![
            Section {
                heading: "FILES",
                paragraphs: vec![
                    tagged(
                        [italic(DEFAULT_CONFIG_PATH)],
                        [roman(
                            "The config file read when --config is not given, if it exists. \
                             Its [server] or [client] table sets the role when no subcommand is \
                             given; [control] sets the control socket and its groups. Unknown \
                             fields are rejected; flags override the file.",
                        )],
                    ),
                    tagged(
                        [italic("/etc/simplevpn/host.key")],
                        [
                            roman(
                                "This host's private key (mode 0600), made when the package \
                                   was installed and named by key = in the default config; ",
                            ),
                            bold("simplevpnd pubkey /etc/simplevpn/host.key"),
                            roman(" prints the public key that the other side pins."),
                        ],
                    ),
                    tagged(
                        [italic("/etc/simplevpn/NAME.toml")],
                        [
                            roman("The config of the instance "),
                            bold("simplevpnd@NAME.service"),
                            roman(", whose control socket is /run/simplevpn/NAME.sock."),
                        ],
                    ),
                    tagged(
                        [italic("/usr/libexec/simplevpn/simplevpn-helper")],
                        [roman(
                            "The privileged helper (or simplevpn-helper beside simplevpnd): \
                             simplevpnd starts it as root, then drops to the service user \
                             (--user, default simplevpn) with no capabilities; the helper \
                             keeps only CAP_NET_ADMIN to create and configure the tun.",
                        )],
                    ),
                    tagged(
                        [italic(DEFAULT_CONTROL_SOCKET)],
                        [
                            roman("The control socket (mode 0660, group simplevpn) that "),
                            bold("svpnctl"),
                            roman(" talks to."),
                        ],
                    ),
                ],
            },
            Section {
                heading: "SYSTEMD",
                paragraphs: vec![text([
                    bold("simplevpnd.service"),
                    roman(" runs the daemon with "),
                    italic(DEFAULT_CONFIG_PATH),
                    roman("; "),
                    bold("simplevpnd@NAME.service"),
                    roman(
                        " runs one per /etc/simplevpn/NAME.toml. Under systemd the daemon \
                         reports READY=1 once it serves (a client: once started; it keeps \
                         reconnecting), a STATUS= line such as \"serving 3 peers on \
                         0.0.0.0:2002\" or \"connected to HOST as ADDRESS\" (see systemctl \
                         status), and pings the watchdog from its event loop.",
                    ),
                ])],
            },
            Section {
                heading: "SIGNALS",
                paragraphs: vec![text([roman(
                    "SIGTERM and SIGINT close every connection, remove the tun device and \
                     the control socket, and exit with status 0.",
                )])],
            },
            Section {
                heading: "EXIT STATUS",
                paragraphs: vec![
                    tagged([bold("0")], [roman("Stopped by SIGTERM or SIGINT.")]),
                    tagged(
                        [bold("1")],
                        [roman(
                            "A failure while running (tun device, listen address, ...).",
                        )],
                    ),
                    tagged(
                        [bold("2")],
                        [roman(
                            "A bad flag or config value, named in one line on stderr.",
                        )],
                    ),
                ],
            },
            see_also(&[
                "svpnctl(1)",
                "simplevpnd-server(8)",
                "simplevpnd-client(8)",
                "systemctl(1)",
            ]),
        ],
    }
}

fn svpnctl() -> Program {
    Program {
        cmd: simplevpn::ctl::cli::Cli::command(),
        section: "1",
        manual: "User Commands",
        extra: vec![
            Section {
                heading: "EXIT STATUS",
                paragraphs: vec![
                    tagged([bold("0")], [roman("Success.")]),
                    tagged(
                        [bold("1")],
                        [roman(
                            "A failure: no daemon at the socket, no such peer, no permission.",
                        )],
                    ),
                    tagged([bold("2")], [roman("A usage error.")]),
                ],
            },
            Section {
                heading: "PERMISSIONS",
                paragraphs: vec![text([roman(
                    "Whoever can open the socket (root and the members of its group, \
                     simplevpn by default) may read; kick is allowed for root, the daemon's \
                     own user and the members of the daemon's [control] admin_group.",
                )])],
            },
            Section {
                heading: "FILES",
                paragraphs: vec![
                    tagged(
                        [italic(DEFAULT_CONTROL_SOCKET)],
                        [roman("The control socket of simplevpnd.service.")],
                    ),
                    tagged(
                        [italic("/run/simplevpn/NAME.sock")],
                        [roman("The control socket of simplevpnd@NAME.service.")],
                    ),
                ],
            },
            see_also(&["simplevpnd(8)"]),
        ],
    }
}
