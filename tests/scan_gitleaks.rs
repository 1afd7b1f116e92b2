//! The README's secret scanning rule, run by the real scanner: gitleaks, built from its pinned Go
//! module by `hack/build-gitleaks` (first run: it builds, printing progress; then cached).
//!
//! A temporary directory gets files in the shapes tokens leak in (.env, YAML, JSON, shell, URLs,
//! a Kubernetes Secret), holding real tokens from the product's own generator, with the default
//! prefix and a custom one, among look-alikes. The rule text is taken from README.md (the
//! ```toml block after `# .gitleaks.toml`), and for the custom prefix the same rule changed the
//! way the README says, so the docs and this test cannot drift apart.
//!
//! What a regular expression can and cannot do: it finds the shape (prefix, 54 base62
//! characters, word boundaries) but cannot compute a CRC32, so a string of the right shape with a
//! wrong checksum is a candidate too. The README says so; the leak-report endpoint's offline
//! check answers such a candidate `false_positive`. The test asserts both halves: gitleaks finds
//! exactly the real tokens plus the wrong-checksum look-alikes, and of those, the endpoint's
//! parsing and checksum keep exactly the real tokens.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use apitoken_operator::core::token;
use apitoken_operator::verify::leak_report::{self, Label};
use rand::SeedableRng;
use rand::rngs::StdRng;

const CUSTOM_PREFIX: &str = "acme_ci";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The gitleaks binary, built by `hack/build-gitleaks` when missing (its progress goes to stderr).
fn gitleaks() -> PathBuf {
    let out = Command::new(repo().join("hack/build-gitleaks"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running hack/build-gitleaks");
    assert!(out.status.success(), "hack/build-gitleaks failed (see its output above)");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The ```toml block of README.md that starts with `# .gitleaks.toml`.
fn readme_rule() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("```toml\n# .gitleaks.toml\n")
        .expect("README.md has a ```toml block starting `# .gitleaks.toml`");
    let block = &readme[start + "```toml\n".len()..];
    block[..block.find("```").expect("the toml block ends")].to_string()
}

/// The README's rule for another prefix, changed as the README says: `apitok_` replaced by
/// `<prefix>_` in `regex` and `keywords`, and an `id` of its own (gitleaks keys rules by id).
fn rule_for_prefix(rule: &str, prefix: &str) -> String {
    let rule = rule.replace("apitok_", &format!("{prefix}_"));
    let rule = rule.replace(r#"id = "apitoken-operator""#, &format!(r#"id = "apitoken-operator-{prefix}""#));
    assert!(
        rule.contains(&format!(r#"id = "apitoken-operator-{prefix}""#)),
        "the README's rule id changed:\n{rule}"
    );
    rule
}

/// `s` with its character at `pos` (counted in bytes, ASCII) replaced by `c`.
fn replace_at(s: &str, pos: usize, c: &str) -> String {
    format!("{}{c}{}", &s[..pos], &s[pos + 1..])
}

/// A base62 character other than `c`.
fn other_base62(c: u8) -> char {
    if c == b'7' { '8' } else { '7' }
}

struct Corpus {
    /// Every real token written, and the rule that must find it.
    real: Vec<(String, &'static str)>,
    /// Right shape, wrong checksum: the regex finds them, the endpoint's checksum refuses them.
    wrong_checksum: Vec<String>,
    /// Nothing the rule should find.
    look_alikes: Vec<String>,
}

#[allow(clippy::too_many_lines)] // one corpus: the strings and the files that place them, side by side
fn write_corpus(dir: &Path) -> Corpus {
    let mut rng = StdRng::seed_from_u64(13);
    let mut gen_tok = |prefix: &str| token::generate(prefix, &mut rng).plaintext.expose().to_string();
    let default: Vec<String> = (0..8).map(|_| gen_tok(token::DEFAULT_PREFIX)).collect();
    let custom: Vec<String> = (0..4).map(|_| gen_tok(CUSTOM_PREFIX)).collect();
    let d = |i: usize| default[i].as_str();
    let c = |i: usize| custom[i].as_str();
    let body_of = |t: &str| t[t.len() - token::BODY_LEN..].to_string();
    let b0 = body_of(d(0));

    let wrong_checksum = {
        let last = d(0).len() - 1;
        let mut w = vec![
            replace_at(d(0), last, &other_base62(d(0).as_bytes()[last]).to_string()),
            // One character of the secret changed: the shape holds, the checksum does not.
            replace_at(d(1), 30, &other_base62(d(1).as_bytes()[30]).to_string()),
            replace_at(c(0), c(0).len() - 1, &other_base62(c(0).as_bytes()[c(0).len() - 1]).to_string()),
            // The right prefix and length around another token's body (checksum over the prefix).
            format!("apitok_{}", body_of(c(1))),
        ];
        w.dedup();
        w
    };
    for w in &wrong_checksum {
        assert_eq!(token::parse(w), Err(token::ParseError::ChecksumMismatch), "{w}");
    }

    let ghp = "ghp_1234567890abcdefghijABCDEFGHIJ123456";
    let look_alikes: Vec<String> = vec![
        d(2)[..d(2).len() - 1].to_string(),  // truncated by one
        d(2)[..d(2).len() - 10].to_string(), // truncated by ten
        format!("{}Q", d(3)),                // over-long by one
        format!("{}{}", d(3), &b0[..6]),     // over-long by six
        format!("apitokx_{b0}"),             // other prefixes
        format!("xapitok_{b0}"),
        format!("APITOK_{b0}"),
        format!("apitok-{b0}"),
        format!("apitok__{b0}"),
        format!("apitok_{}", replace_at(&b0, 20, "-")), // a non-base62 character
        format!("apitok_{}", replace_at(&b0, 20, "+")),
        format!("apitok_{}", replace_at(&b0, 53, "/")),
        format!("apitok_{}", replace_at(&b0, 5, "é")),
        format!("apitok_{}", replace_at(&b0, 5, "_")),
        format!("myapitok_{b0}"), // glued inside longer words
        format!("{b0}apitok_{b0}"),
        format!("{}suffix", d(4)),
        format!("x_{}", d(4)),
        format!("foo{}", c(2)),
        format!("{}0", c(2)),
        format!("acme_cd_{}", body_of(c(3))), // a near custom prefix
        format!("cme_ci_{}", body_of(c(3))),
        ghp.to_string(), // other vendors' shapes
        "xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx".to_string(),
        "AKIAIOSFODNN7EXAMPLE".to_string(),
        format!("sk_live_{b0}"),
        format!("sk_test_{b0}"),
        format!("github_pat_11ABCDEFG0_{b0}"),
        "glpat-abcdefghij0123456789".to_string(),
    ];
    for l in &look_alikes {
        assert!(token::parse(l).is_err(), "look-alike {l} is a valid token");
    }

    let write = |name: &str, content: String| std::fs::write(dir.join(name), content).unwrap();
    write(
        ".env",
        format!(
            "# service credentials\nAPI_TOKEN={}\nOTHER_TOKEN=\"{}\"\nSLACK_BOT_TOKEN={}\nAWS_ACCESS_KEY_ID={}\nGITHUB_TOKEN={ghp}\nCI_TOKEN={}\n",
            d(0),
            look_alikes[0],
            look_alikes[23],
            look_alikes[24],
            c(0)
        ),
    );
    write(
        "config.yaml",
        format!(
            "collector:\n  token: \"{}\"\n  fallback: '{}'\n  notes: {} {}\nstripe:\n  key: {}\n  test: {}\nci:\n  token: {}\n",
            d(1),
            look_alikes[2],
            look_alikes[4],
            look_alikes[5],
            look_alikes[25],
            look_alikes[26],
            c(1)
        ),
    );
    write(
        "settings.json",
        serde_json::to_string_pretty(&serde_json::json!({
            "auth": {"token": d(2), "previous": look_alikes[1], "broken": look_alikes[9]},
            "github": look_alikes[27],
            "gitlab": look_alikes[28],
            "ci": [c(2), look_alikes[20], look_alikes[21]],
            "checksums": [wrong_checksum[0], wrong_checksum[1]],
        }))
        .unwrap(),
    );
    write(
        "deploy.sh",
        format!(
            "#!/bin/sh\ncurl -fsS -H \"Authorization: Bearer {}\" https://verify.example/v1/verify\n\
             curl 'https://api.example/v1/x?token={}&page=2'\n# {} {} {}\nexport TOKEN={}\n",
            d(3),
            d(4),
            look_alikes[6],
            look_alikes[7],
            look_alikes[8],
            wrong_checksum[2]
        ),
    );
    write(
        "secret.yaml",
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: collector}}\nstringData:\n  token: {}\n  token-ci: {}\n  \
             copy: {}\n",
            d(5),
            c(3),
            wrong_checksum[3]
        ),
    );
    write(
        "notes.md",
        format!(
            "Glued and broken ones that are not tokens:\n{}\n\nThe token was `{}`, and ({}).\n{}",
            look_alikes
                .iter()
                .enumerate()
                .filter(|(i, _)| [3, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19].contains(i))
                .map(|(_, l)| format!("- {l}"))
                .collect::<Vec<_>>()
                .join("\n"),
            d(6),
            d(6),
            // Last line, no newline at the end of the file.
            d(7)
        ),
    );

    let mut real: Vec<(String, &'static str)> =
        default.iter().map(|t| (t.clone(), "apitoken-operator")).collect();
    real.extend(custom.iter().map(|t| (t.clone(), "apitoken-operator-acme_ci")));
    Corpus { real, wrong_checksum, look_alikes }
}

/// One gitleaks finding.
#[derive(Debug, PartialEq, Eq)]
struct Finding {
    rule: String,
    secret: String,
    /// The file's name.
    file: String,
}

/// Runs `gitleaks dir` on `dir` with `config`; returns the exit code and the findings.
fn scan(gitleaks: &Path, dir: &Path, config: &str, work: &Path) -> (i32, Vec<Finding>) {
    let config_path = work.join("gitleaks.toml");
    let report_path = work.join("report.json");
    std::fs::write(&config_path, config).unwrap();
    let _ = std::fs::remove_file(&report_path);
    let out = Command::new(gitleaks)
        .args(["dir", "--no-banner", "--log-level", "warn", "--report-format", "json"])
        .arg("--config")
        .arg(&config_path)
        .arg("--report-path")
        .arg(&report_path)
        .arg(dir)
        // Its .gitleaksignore lookup and config variables must not come from the environment.
        .current_dir(work)
        .env_remove("GITLEAKS_CONFIG")
        .env_remove("GITLEAKS_CONFIG_TOML")
        .output()
        .expect("running gitleaks");
    let code = out.status.code().expect("gitleaks exited");
    assert!(code == 0 || code == 1, "gitleaks failed ({code}): {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    let findings = report
        .as_array()
        .expect("a JSON array report")
        .iter()
        .map(|f| Finding {
            rule: f["RuleID"].as_str().unwrap().to_string(),
            secret: f["Secret"].as_str().unwrap().to_string(),
            file: Path::new(f["File"].as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned(),
        })
        .collect();
    (code, findings)
}

#[test]
fn gitleaks_with_the_readme_rule_finds_exactly_the_real_tokens_after_the_checksum() {
    let gitleaks = gitleaks();
    let version = Command::new(&gitleaks).arg("version").output().unwrap();
    println!("gitleaks {} ({})", String::from_utf8_lossy(&version.stdout).trim(), gitleaks.display());

    let rule = readme_rule();
    assert!(
        rule.contains(&format!("regex = '''{}'''", token::SCANNER_REGEX)),
        "README rule vs SCANNER_REGEX:\n{rule}"
    );
    let custom_rule = rule_for_prefix(&rule, CUSTOM_PREFIX);
    assert!(custom_rule.contains(&token::scanner_regex(CUSTOM_PREFIX)), "{custom_rule}");
    let config = format!("{rule}\n{}", custom_rule.trim_start_matches("# .gitleaks.toml\n"));

    let work = std::env::temp_dir().join(format!("apitoken-scan-gitleaks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let files = work.join("repo");
    std::fs::create_dir_all(&files).unwrap();
    let corpus = write_corpus(&files);

    let (code, findings) = scan(&gitleaks, &files, &config, &work);
    assert_eq!(code, 1, "gitleaks exits 1 when it finds leaks");
    let found: BTreeSet<String> = findings.iter().map(|f| f.secret.clone()).collect();
    let real: BTreeSet<String> = corpus.real.iter().map(|(t, _)| t.clone()).collect();
    let wrong: BTreeSet<String> = corpus.wrong_checksum.iter().cloned().collect();
    let expected: BTreeSet<String> = real.union(&wrong).cloned().collect();
    let missed: Vec<_> = expected.difference(&found).collect();
    let extra: Vec<_> = found.difference(&expected).collect();
    assert!(missed.is_empty() && extra.is_empty(), "missed {missed:?}; found look-alikes {extra:?}");
    for l in &corpus.look_alikes {
        assert!(!found.contains(l), "found look-alike {l}");
    }
    // Each real token by the rule for its prefix.
    for (t, rule_id) in &corpus.real {
        assert!(
            findings.iter().any(|f| &f.secret == t && &f.rule == rule_id),
            "{t} not found by {rule_id}: {findings:?}"
        );
    }
    // Every occurrence once (a real token is written once, one of them twice in notes.md): a
    // glued or over-long look-alike holding a real token's text adds no finding.
    assert_eq!(findings.len(), corpus.real.len() + 1 + wrong.len(), "{findings:#?}");
    // The glued look-alikes hold real tokens' text (notes.md): only the two real tokens there
    // are found in it (one of them twice).
    let in_notes: Vec<&str> =
        findings.iter().filter(|f| f.file == "notes.md").map(|f| f.secret.as_str()).collect();
    assert_eq!(in_notes.len(), 3, "{in_notes:?}");
    assert!(in_notes.iter().all(|s| *s == corpus.real[6].0 || *s == corpus.real[7].0), "{in_notes:?}");

    // What the endpoint does with the candidates GitHub would report: parse the report and keep
    // those whose checksum holds; that is exactly the real tokens.
    let report: Vec<_> =
        found.iter().map(|s| serde_json::json!({"token": s, "type": "apitoken_operator_token"})).collect();
    let report = leak_report::parse_report(serde_json::to_string(&report).unwrap().as_bytes()).unwrap();
    let (kept, refused): (Vec<_>, Vec<_>) = report.iter().partition(|r| r.well_formed().is_ok());
    let kept: BTreeSet<String> = kept.iter().map(|r| r.token.expose().to_string()).collect();
    assert_eq!(kept, real);
    assert_eq!(refused.len(), wrong.len());
    for r in refused {
        assert_eq!(r.feedback(Label::FalsePositive).label, Label::FalsePositive);
    }
    println!(
        "gitleaks found {} secrets with the README rule: the {} real tokens ({} with the custom prefix {CUSTOM_PREFIX}) \
         and {} wrong-checksum look-alikes, which the endpoint's checksum answers false_positive; {} other \
         look-alikes not found",
        found.len(),
        real.len(),
        corpus.real.iter().filter(|(_, r)| r.ends_with(CUSTOM_PREFIX)).count(),
        wrong.len(),
        corpus.look_alikes.len()
    );

    // Only look-alikes that are not candidates: nothing found, exit code 0.
    let clean = work.join("clean");
    std::fs::create_dir_all(&clean).unwrap();
    std::fs::write(clean.join("notes.txt"), corpus.look_alikes.join("\n")).unwrap();
    let (code, findings) = scan(&gitleaks, &clean, &config, &work);
    assert_eq!((code, findings), (0, vec![]), "look-alikes only");
    let _ = std::fs::remove_dir_all(&work);
}
