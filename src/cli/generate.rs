//! `outboxd completions` and `outboxd man`: shell completion scripts and man
//! pages generated from the clap definition, so that they never drift from it.

use std::io::Write;

use clap::CommandFactory;

use super::Cli;

/// Prints the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> i32 {
    let mut command = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "outboxd", &mut out);
    write_stdout(&out, "the completion script")
}

/// Prints the man page of `outboxd`, or of one subcommand, as roff to stdout.
pub fn man(subcommand: Option<&str>) -> i32 {
    let mut command = Cli::command();
    // Building gives subcommands their display name (`outboxd-status`),
    // which becomes the page title.
    command.build();
    let page = match subcommand {
        None => command,
        Some(name) => match command.find_subcommand(name) {
            Some(sub) if name != "help" => sub.clone(),
            _ => {
                let names: Vec<&str> = command
                    .get_subcommands()
                    .map(|c| c.get_name())
                    .filter(|n| *n != "help")
                    .collect();
                eprintln!(
                    "error: no subcommand named {name:?}; use one of: {}",
                    names.join(", ")
                );
                return 2;
            }
        },
    };
    let mut out = Vec::new();
    // Subcommands carry no version, so the footer of their pages would lack it.
    let source = concat!("outboxd ", env!("CARGO_PKG_VERSION"));
    if let Err(err) = clap_mangen::Man::new(page).source(source).render(&mut out) {
        eprintln!("error: rendering the man page failed: {err}");
        return 1;
    }
    write_stdout(&out, "the man page")
}

fn write_stdout(bytes: &[u8], what: &str) -> i32 {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|_| stdout.flush()) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: writing {what} to stdout failed: {err}");
            1
        }
    }
}
