//! Dependencies between the crate's top-level modules run one way: the
//! cycle check over `src/` (also run by `.ci/run`) must pass, and it must
//! be able to fail (its self-test runs it on synthetic trees with cycles).

use std::process::Command;

fn run_check(args: &[&str]) -> (bool, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/check-cycles.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs the cycle check (it is in .ci/run's packages)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let (ok, text) = run_check(&[src]);
    assert!(ok, "the cycle check failed:\n{text}");
    assert!(
        text.contains("tunnel "),
        "the graph lists the modules:\n{text}"
    );
}

#[test]
fn the_cycle_check_fails_on_a_cycle() {
    let (ok, text) = run_check(&["--self-test"]);
    assert!(ok, "the cycle check's self-test failed:\n{text}");
    assert!(
        text.contains("ok: two-module cycle"),
        "the self-test ran its cycle cases:\n{text}"
    );
}
