//! Times on the wire: RFC 3339 in UTC, seconds precision, as the status
//! document shows them. A leaf, so the control layer can stamp its records
//! without importing the admin layer.

/// Formats a time as RFC 3339 in UTC, seconds precision.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    let dt = dt.replace_nanosecond(0).unwrap_or(dt);
    dt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "?".into())
}
