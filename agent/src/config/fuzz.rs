//! Fuzzing the configuration file: arbitrary text and the shipped
//! configurations mutated line by line (lines dropped, doubled, swapped,
//! values replaced by hostile ones, bytes inserted) load or fail with a
//! message that names the file; nothing panics.

use std::path::Path;

use proptest::prelude::*;

use super::*;

/// The configurations the package and the examples ship.
const SEEDS: [&str; 2] = [
    include_str!("../../../packaging/agent.toml"),
    include_str!("../../../examples/agent.toml"),
];

/// Values an operator's typo or a hostile writer may put after `=`.
const VALUES: &[&str] = &[
    "\"\"",
    "\"ngnix\"",
    "-1",
    "0",
    "99999999999999999999",
    "1e309",
    "true",
    "[]",
    "[[]]",
    "{}",
    "{ a = 1 }",
    "\"../../etc/passwd\"",
    "\"/\"",
    "\"relative/path\"",
    "\"\\u0000\"",
    "\"line\\nbreak\"",
    "\"0s\"",
    "\"1x\"",
    "\"10000000000d\"",
    "\"0o777\"",
    "\"999999\"",
    "\"root\"",
    "\"no-such-user-certctl\"",
    "\"127.0.0.1:0\"",
    "\"[::1]:99999\"",
    "\"unix/\"",
    "\"https://x\"",
    "[\"\"]",
    "[\"/bin/false\", \"\"]",
    "1979-05-27T07:32:00Z",
];

/// One edit of a configuration's text.
#[derive(Debug, Clone)]
enum Edit {
    Drop(prop::sample::Index),
    Double(prop::sample::Index),
    Swap(prop::sample::Index, prop::sample::Index),
    Value(prop::sample::Index, prop::sample::Index),
    Key(prop::sample::Index, String),
    Insert(prop::sample::Index, Vec<u8>),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Edit::Drop),
        any::<prop::sample::Index>().prop_map(Edit::Double),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Edit::Swap(a, b)),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Edit::Value(a, b)),
        (any::<prop::sample::Index>(), "[a-z_]{0,3}").prop_map(|(a, k)| Edit::Key(a, k)),
        (
            any::<prop::sample::Index>(),
            proptest::collection::vec(any::<u8>(), 1..8)
        )
            .prop_map(|(a, b)| Edit::Insert(a, b)),
    ]
}

fn apply(text: &str, edit: &Edit) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if lines.is_empty() {
        return text.to_owned();
    }
    match edit {
        Edit::Drop(i) => {
            lines.remove(i.index(lines.len()));
        }
        Edit::Double(i) => {
            let at = i.index(lines.len());
            lines.insert(at, lines[at].clone());
        }
        Edit::Swap(a, b) => {
            let (a, b) = (a.index(lines.len()), b.index(lines.len()));
            lines.swap(a, b);
        }
        Edit::Value(i, v) => {
            // Among the lines that set a key.
            let setting: Vec<usize> = (0..lines.len())
                .filter(|&n| {
                    let l = lines[n].trim_start();
                    !l.starts_with('#') && l.contains(" = ")
                })
                .collect();
            if !setting.is_empty() {
                let n = setting[i.index(setting.len())];
                if let Some((key, _)) = lines[n].split_once(" = ") {
                    lines[n] = format!("{key} = {}", VALUES[v.index(VALUES.len())]);
                }
            }
        }
        Edit::Key(i, suffix) => {
            let n = i.index(lines.len());
            if let Some((key, value)) = lines[n].split_once(" = ") {
                lines[n] = format!("{key}{suffix} = {value}");
            }
        }
        Edit::Insert(i, bytes) => {
            let n = i.index(lines.len());
            lines[n].push_str(&String::from_utf8_lossy(bytes));
        }
    }
    lines.join("\n")
}

/// Loads `text` as if from `path`: success, or an error that names the
/// file and says something.
fn loads_or_names_the_file(text: &str, path: &Path) -> Result<(), TestCaseError> {
    match parse(text, path) {
        Ok(config) => {
            // What loaded is usable: every target has a name and a drop.
            for t in &config.targets {
                prop_assert!(!t.name.is_empty());
            }
        }
        Err(e) => {
            let shown = e.to_string();
            prop_assert!(!shown.trim().is_empty());
            prop_assert!(shown.contains(&path.display().to_string()), "{shown}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(crate::fuzzing::config(256))]

    #[test]
    fn any_text_loads_or_names_the_file(text in any::<String>()) {
        loads_or_names_the_file(&text, Path::new("/etc/certctl/agent.toml"))?;
    }

    #[test]
    fn edited_configurations_load_or_name_the_file(
        seed in 0usize..SEEDS.len(),
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let mut text = SEEDS[seed].to_owned();
        for e in &edits {
            text = apply(&text, e);
        }
        loads_or_names_the_file(&text, Path::new("/etc/certctl/agent.toml"))?;
    }
}
