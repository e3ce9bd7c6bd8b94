//! The classic Prometheus text format, from the OpenMetrics text the
//! registry writes.

/// OpenMetrics text to the classic text format. They differ, for what we
/// export, only in that OpenMetrics names a counter family without its
/// `_total` suffix in `# HELP`/`# TYPE` (the classic format names the
/// sample), has `# UNIT` lines, and ends with `# EOF`.
pub(super) fn openmetrics_to_classic(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|r| r.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod classic_tests {
    use super::openmetrics_to_classic;

    #[test]
    fn counters_are_named_by_their_sample_and_eof_goes() {
        let om = "# HELP a_dials Dials.\n# TYPE a_dials counter\na_dials_total{r=\"ok\"} 3\n\
                  # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n# UNIT a_s seconds\n# EOF\n";
        assert_eq!(
            openmetrics_to_classic(om),
            "# HELP a_dials_total Dials.\n# TYPE a_dials_total counter\na_dials_total{r=\"ok\"} 3\n\
             # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n"
        );
    }
}
