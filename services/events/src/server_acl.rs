//! Server ACLs (`m.room.server_acl`): whether a server may take part in a room.
//!
//! A server name's host part (without port) is checked: IP literals are
//! refused when `allow_ip_literals` is false; any `deny` pattern refuses; then
//! any `allow` pattern admits; anything else is refused. Patterns use `*`
//! (any run of characters) and `?` (one character).

use serde_json::Value;

fn glob(pattern: &[char], name: &[char]) -> bool {
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut p, mut n) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some(p);
            mark = n;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            n = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

fn host_of(server: &str) -> &str {
    if server.starts_with('[') {
        return server
            .split(']')
            .next()
            .map(|h| h.trim_start_matches('['))
            .unwrap_or(server);
    }
    match server.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) && !host.contains(':') => {
            host
        }
        _ => server,
    }
}

/// Whether `server` may participate under an ACL event's content. A missing
/// or malformed ACL allows everyone (as if there were none).
pub fn allows(acl: Option<&Value>, server: &str) -> bool {
    let Some(acl) = acl.filter(|a| a.is_object()) else {
        return true;
    };
    let host = host_of(server).to_ascii_lowercase();
    let list = |field: &str| -> Vec<Vec<char>> {
        acl.get(field)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(|s| s.to_ascii_lowercase().chars().collect())
                    .collect()
            })
            .unwrap_or_default()
    };
    let name: Vec<char> = host.chars().collect();
    let allow_ip_literals = acl
        .get("allow_ip_literals")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    if is_ip && !allow_ip_literals {
        return false;
    }
    if list("deny").iter().any(|p| glob(p, &name)) {
        return false;
    }
    list("allow").iter().any(|p| glob(p, &name))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::allows;

    #[test]
    fn acl_rules() {
        let acl = json!({ "allow": ["*"], "deny": ["evil.example", "*.spam.org"], "allow_ip_literals": false });
        assert!(allows(Some(&acl), "good.example"));
        assert!(allows(Some(&acl), "good.example:8448"));
        assert!(!allows(Some(&acl), "evil.example"));
        assert!(!allows(Some(&acl), "Evil.Example:443"));
        assert!(!allows(Some(&acl), "a.b.spam.org"));
        assert!(!allows(Some(&acl), "127.0.0.1:8448"));
        assert!(!allows(Some(&acl), "[::1]:8448"));
        let allow_list = json!({ "allow": ["*.trusted.org", "exact.net"] });
        assert!(allows(Some(&allow_list), "x.trusted.org"));
        assert!(allows(Some(&allow_list), "exact.net"));
        assert!(
            !allows(Some(&allow_list), "other.net"),
            "not on the allow list"
        );
        assert!(
            !allows(Some(&allow_list), "127.0.0.1"),
            "not on the allow list either"
        );
        assert!(
            allows(Some(&json!({ "allow": ["*"] })), "127.0.0.1"),
            "IP literals are allowed by default"
        );
        assert!(allows(None, "anyone.org"));
        assert!(allows(Some(&json!({ "allow": ["a?c.org"] })), "abc.org"));
        assert!(!allows(Some(&json!({ "allow": ["a?c.org"] })), "abbc.org"));
    }
}
