//! `keygate bench cluster` end to end, briefly (real processes over Unix sockets): with two
//! members, genesis on a and b joined from it, the load generator's connections reach both,
//! both release the first member's key, and no fetch fails. Asserts no time or rate.

use std::time::Duration;

use keygate_tests::{bin, run_with_limit};

/// The table line of the row with `members` members, split into its cells.
fn row(out: &str, members: &str) -> Vec<String> {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("| {members} | ")))
        .unwrap_or_else(|| panic!("no row for {members} members in:\n{out}"));
    line.trim_matches('|').split('|').map(|c| c.trim().to_owned()).collect()
}

#[test]
fn two_members_share_the_load_and_release_the_same_key() {
    let out = run_with_limit(
        std::process::Command::new(bin("keygate")).args([
            "bench",
            "cluster",
            "--members",
            "1,2",
            "--connections",
            "4",
            "--threads",
            "1",
            "--seconds",
            "0.5",
        ]),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for (members, split) in [("1", 1), ("2", 2)] {
        let cells = row(&text, members);
        // members | connections | releases by member | releases | … | errors | wrong keys
        let by_member: Vec<u64> = cells[2].split(" / ").map(|n| n.parse().expect("a count")).collect();
        assert_eq!(by_member.len(), split, "{text}");
        assert!(by_member.iter().all(|&n| n > 0), "every member released: {text}");
        assert_eq!(by_member.iter().sum::<u64>(), cells[3].parse::<u64>().expect("releases"), "{text}");
        assert_eq!(cells[cells.len() - 2], "0", "no error: {text}");
        assert_eq!(cells[cells.len() - 1], "0", "no wrong key: {text}");
    }
    assert!(row(&text, "1")[5] == "1.00", "the one-member row is the base: {text}");
}
