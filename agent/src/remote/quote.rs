//! An argv as one command line for the remote account's POSIX shell.
//!
//! OpenSSH sends a command as one string, which the server runs as
//! `<login shell> -c <string>`. Each argument is put in single quotes, the
//! one quoting in which a POSIX shell gives no character a meaning except
//! the closing quote; a `'` inside is written `'\''` (close, escaped quote,
//! reopen). Newlines, `$`, backquotes, `\`, `*` and spaces stay literal. A
//! NUL cannot be passed in an argument at all and is refused. The login
//! shell must be a POSIX shell (`sh`, `dash`, `bash`, `ksh`, `zsh`); csh
//! and fish quote differently.

use std::io;

/// `arg` single-quoted for a POSIX shell; an error for a NUL.
pub fn quote(arg: &str) -> io::Result<String> {
    if arg.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a remote command argument contains a NUL byte, which no shell can pass",
        ));
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Ok(out)
}

/// Every argument of `argv` quoted, joined by spaces; an error for an
/// empty argv or a NUL in any argument.
pub fn command_line(argv: &[String]) -> io::Result<String> {
    if argv.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the remote command is empty",
        ));
    }
    let quoted: io::Result<Vec<String>> = argv.iter().map(|a| quote(a)).collect();
    Ok(quoted?.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes() {
        assert_eq!(quote("").unwrap(), "''");
        assert_eq!(quote("a b").unwrap(), "'a b'");
        assert_eq!(quote("it's").unwrap(), "'it'\\''s'");
        assert_eq!(quote("$(rm -rf /)").unwrap(), "'$(rm -rf /)'");
        assert_eq!(quote("a\nb").unwrap(), "'a\nb'");
        assert_eq!(quote("\\'").unwrap(), "'\\'\\'''");
        assert_eq!(
            quote("a\0b").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            command_line(&["printf".into(), "%s\n".into(), "x y".into()]).unwrap(),
            "'printf' '%s\n' 'x y'"
        );
        assert!(command_line(&[]).is_err());
        assert!(command_line(&["a".into(), "\0".into()]).is_err());
    }

    /// What `sh -c <line>` gives `printf '%s\0'` as arguments.
    /// (A first fixed argument, since `printf` with no argument still
    /// prints its format once.)
    pub(super) fn through_sh(argv: &[String]) -> Vec<String> {
        let mut full = vec!["printf".to_owned(), "%s\\0".to_owned(), "start".to_owned()];
        full.extend(argv.iter().cloned());
        let line = command_line(&full).unwrap();
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&line)
            .output()
            .unwrap();
        assert!(out.status.success(), "{line:?}: {:?}", out.status);
        let text = String::from_utf8(out.stdout).unwrap();
        let mut args: Vec<String> = text.split('\0').map(str::to_owned).collect();
        assert_eq!(args.pop().as_deref(), Some(""), "{text:?}");
        assert_eq!(args.remove(0), "start");
        args
    }

    #[test]
    fn hostile_arguments_round_trip_through_sh() {
        let argv: Vec<String> = [
            "",
            " ",
            "'",
            "''",
            "\"",
            "a b\tc",
            "$(touch /tmp/x)",
            "`id`",
            "$HOME",
            "a\nb\n",
            "\\",
            "*",
            "-n",
            "; rm -rf /",
            "é ü 日本",
            "'\\''",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(through_sh(&argv), argv);
    }
}

#[cfg(test)]
mod fuzz {
    //! Any argv without NUL goes through a real `sh -c` exactly.

    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;

    use super::tests::through_sh;

    #[test]
    fn argv_round_trips_through_a_real_shell() {
        let arg = proptest::string::string_regex("[^\\x00]{0,24}").unwrap();
        let shellish = proptest::collection::vec(
            prop_oneof![
                Just("'".to_owned()),
                Just("\\".to_owned()),
                Just("\"".to_owned()),
                Just("$(".to_owned()),
                Just("`".to_owned()),
                Just("\n".to_owned()),
                Just(" ".to_owned()),
                Just("*".to_owned()),
                Just("$1".to_owned()),
            ],
            0..8,
        )
        .prop_map(|v| v.concat());
        let argv = proptest::collection::vec(prop_oneof![arg, shellish], 0..6);
        let mut runner = TestRunner::new(crate::fuzzing::config(64));
        runner
            .run(&argv, |argv| {
                prop_assert_eq!(through_sh(&argv), argv);
                Ok(())
            })
            .unwrap();
    }
}
