//! Keeps README's Layout true: every module under `src/` imports only the layers below it.
//!
//! The check reads the sources rather than trusting review, because one convenient
//! `use crate::grpc::…` in the storage layer would quietly bring the cycles back. Test-only
//! code (`#[cfg(test)]` items) may reach anywhere, and comments are not imports.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// What each layer may import, bottom to top (README, "Layout"). Modules not listed
/// (`server.rs`, `health.rs`, `cli/`, `lib.rs`, `main.rs`) are the top and may import any.
const LAYERS: &[(&str, &[&str])] = &[
    ("domain", &[]),
    ("migration", &["domain"]),
    ("rollout", &["domain", "migration"]),
    ("telemetry", &["domain"]),
    ("storage", &["domain", "migration", "rollout", "telemetry"]),
    (
        "app",
        &["domain", "migration", "rollout", "telemetry", "storage"],
    ),
    (
        "grpc",
        &[
            "domain",
            "migration",
            "rollout",
            "telemetry",
            "storage",
            "app",
        ],
    ),
];

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to: `src/app/jobs.rs` → `app`.
fn module_of(src: &Path, file: &Path) -> String {
    let first = file
        .strip_prefix(src)
        .expect("under src/")
        .components()
        .next()
        .expect("a path under src/");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

/// The lines the build compiles outside tests, without comments: each `#[cfg(test)]` item
/// is skipped up to its closing brace (or its `;`).
fn production_lines(text: &str) -> Vec<&str> {
    let mut kept = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            let mut depth = 0i32;
            let mut opened = false;
            for item in lines.by_ref() {
                depth += item.matches('{').count() as i32 - item.matches('}').count() as i32;
                opened |= item.contains('{');
                if (opened && depth <= 0) || (!opened && item.trim_end().ends_with(';')) {
                    break;
                }
            }
        } else if !trimmed.starts_with("//") {
            kept.push(line);
        }
    }
    kept
}

/// Every `crate::<module>` the lines name.
fn imported_modules(lines: &[&str]) -> BTreeSet<String> {
    let mut modules = BTreeSet::new();
    for line in lines {
        for (at, _) in line.match_indices("crate::") {
            let rest = &line[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                !name.is_empty(),
                "grouped `crate::{{…}}` imports hide their layers; name each module: {line}"
            );
            modules.insert(name);
        }
    }
    modules
}

#[test]
fn no_module_imports_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );

    let mut violations = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        let Some((_, allowed)) = LAYERS.iter().find(|(name, _)| *name == module) else {
            continue;
        };
        let text = fs::read_to_string(file).expect("read a source file");
        for imported in imported_modules(&production_lines(&text)) {
            if imported != module && !allowed.contains(&imported.as_str()) {
                violations.push(format!(
                    "{} ({module}) imports crate::{imported}",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layer violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_imports_and_skips_test_code_and_comments() {
    let text = "use crate::domain::X;\n\
                // see crate::grpc for the wire\n\
                fn f() { crate::storage::g(); }\n\
                #[cfg(test)]\n\
                mod tests {\n\
                    use crate::grpc::proto;\n\
                    fn h() {\n\
                    }\n\
                }\n\
                #[cfg(test)]\n\
                use crate::cli::Cli;\n\
                pub use crate::app::Later;\n";
    let found = imported_modules(&production_lines(text));
    let expected: BTreeSet<String> = ["app", "domain", "storage"].map(String::from).into();
    assert_eq!(found, expected);
}
