//! The admin API's wire protocol: every request as one enum, and the
//! request and response bodies as serde types. The server (the `admin`
//! module) parses requests with [`Request::parse`]; the client (the
//! `client` module) builds them with
//! [`Request::method`], [`Request::path`] and [`Request::body`]. One place
//! for paths and shapes keeps both ends in step.

use serde::{Deserialize, Serialize};

pub use crate::admin::streams::{StreamSort, StreamsQuery};
pub use crate::config::NodeSpec;
pub use crate::control::ReloadReport;

/// The HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `POST`.
    Post,
    /// `DELETE`.
    Delete,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

/// One admin request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `GET /v1/status`: the [`StatusDocument`].
    Status,
    /// `GET /v1/streams[?node=N&sort=age|buffered&limit=N]`: the
    /// [`StreamsDocument`].
    Streams(StreamsQuery),
    /// `GET /healthz`: 200 while the process serves.
    Health,
    /// `GET /readyz`: 200 when enough nodes are healthy.
    Ready,
    /// `GET /metrics`: OpenMetrics text.
    Metrics,
    /// `POST /v1/nodes` with a [`NodeSpec`]: answered with [`Added`].
    AddNode(NodeSpec),
    /// `DELETE /v1/nodes/{name}`: answered with [`Removed`].
    RemoveNode(String),
    /// `POST /v1/nodes/{name}/drain`: answered with [`DrainChanged`].
    Drain(String),
    /// `POST /v1/nodes/{name}/undrain`: answered with [`DrainChanged`].
    Undrain(String),
    /// `POST /v1/nodes/{name}/reconnect`: answered with [`Reconnected`].
    Reconnect(String),
    /// `POST /v1/reload`: answered with a [`ReloadReport`].
    Reload,
}

/// Why a request could not be parsed; the server's answer follows from it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// No such endpoint (404).
    #[error("no such endpoint: {0}")]
    NotFound(String),
    /// The endpoint exists, the method does not (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body is not JSON, or not the expected shape (400).
    #[error("{0}")]
    BadBody(String),
    /// A query parameter is unknown or its value is not valid (400).
    #[error("{0}")]
    BadQuery(String),
    /// A path segment is not a node name any node can have (400).
    #[error("{0:?} is not a valid node name (lowercase letters, digits, '-' and '.')")]
    BadName(String),
}

impl Request {
    /// The request's method.
    pub fn method(&self) -> Method {
        match self {
            Request::Status
            | Request::Streams(_)
            | Request::Health
            | Request::Ready
            | Request::Metrics => Method::Get,
            Request::RemoveNode(_) => Method::Delete,
            Request::AddNode(_)
            | Request::Drain(_)
            | Request::Undrain(_)
            | Request::Reconnect(_)
            | Request::Reload => Method::Post,
        }
    }

    /// The request's path. Node names are DNS subdomains, so they go into
    /// the path as they are; [`Request::check`] refuses any other name
    /// before a request is sent.
    pub fn path(&self) -> String {
        match self {
            Request::Status => "/v1/status".into(),
            Request::Streams(q) => {
                let mut params = Vec::new();
                if let Some(n) = &q.node {
                    params.push(format!("node={n}"));
                }
                if q.sort != StreamSort::default() {
                    params.push(format!("sort={}", q.sort.as_str()));
                }
                if let Some(l) = q.limit {
                    params.push(format!("limit={l}"));
                }
                if params.is_empty() {
                    "/v1/streams".into()
                } else {
                    format!("/v1/streams?{}", params.join("&"))
                }
            }
            Request::Health => "/healthz".into(),
            Request::Ready => "/readyz".into(),
            Request::Metrics => "/metrics".into(),
            Request::AddNode(_) => "/v1/nodes".into(),
            Request::RemoveNode(n) => format!("/v1/nodes/{n}"),
            Request::Drain(n) => format!("/v1/nodes/{n}/drain"),
            Request::Undrain(n) => format!("/v1/nodes/{n}/undrain"),
            Request::Reconnect(n) => format!("/v1/nodes/{n}/reconnect"),
            Request::Reload => "/v1/reload".into(),
        }
    }

    /// The JSON body, if the request has one.
    pub fn body(&self) -> Option<Vec<u8>> {
        match self {
            Request::AddNode(spec) => serde_json::to_vec(spec).ok(),
            _ => None,
        }
    }

    /// Refuses a request that names a node by a name no node can have
    /// (one that would not even fit in a path segment), so the client
    /// says so instead of asking the daemon about it.
    pub fn check(&self) -> Result<(), RequestError> {
        match self {
            Request::RemoveNode(n)
            | Request::Drain(n)
            | Request::Undrain(n)
            | Request::Reconnect(n)
                if !crate::config::valid_node_name(n) =>
            {
                Err(RequestError::BadName(n.clone()))
            }
            Request::Streams(StreamsQuery { node: Some(n), .. })
                if !crate::config::valid_node_name(n) =>
            {
                Err(RequestError::BadName(n.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Parses a request from its method, path (with its query, if any)
    /// and body. Only `/v1/streams` reads its query; the other endpoints
    /// ignore one, as they always have.
    pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<Request, RequestError> {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        // Any other name is passed on: the registry answers "no node
        // named ..." (404) for it, as for any name it does not hold.
        let node_name = |n: &str| Ok::<_, RequestError>(n.to_string());
        let get = |r: Request| match method {
            "GET" => Ok(r),
            _ => Err(RequestError::MethodNotAllowed),
        };
        let post = |r: Request| match method {
            "POST" => Ok(r),
            _ => Err(RequestError::MethodNotAllowed),
        };
        match segments.as_slice() {
            ["v1", "status"] => get(Request::Status),
            ["v1", "streams"] => get(Request::Streams(streams_query(query)?)),
            ["healthz"] => get(Request::Health),
            ["readyz"] => match method {
                "GET" => Ok(Request::Ready),
                _ => Err(RequestError::NotFound(path.to_string())),
            },
            ["metrics"] => match method {
                "GET" => Ok(Request::Metrics),
                _ => Err(RequestError::NotFound(path.to_string())),
            },
            ["v1", "reload"] => post(Request::Reload),
            ["v1", "nodes"] => match method {
                "POST" => {
                    let value: serde_json::Value = serde_json::from_slice(body)
                        .map_err(|e| RequestError::BadBody(format!("body is not JSON: {e}")))?;
                    let spec: NodeSpec = serde_json::from_value(value)
                        .map_err(|e| RequestError::BadBody(format!("invalid node: {e}")))?;
                    Ok(Request::AddNode(spec))
                }
                _ => Err(RequestError::MethodNotAllowed),
            },
            ["v1", "nodes", n] => match method {
                "DELETE" => Ok(Request::RemoveNode(node_name(n)?)),
                _ => Err(RequestError::MethodNotAllowed),
            },
            ["v1", "nodes", n, "drain"] => post(Request::Drain(node_name(n)?)),
            ["v1", "nodes", n, "undrain"] => post(Request::Undrain(node_name(n)?)),
            ["v1", "nodes", n, "reconnect"] => post(Request::Reconnect(node_name(n)?)),
            ["v1", "nodes", ..] => Err(RequestError::MethodNotAllowed),
            _ => Err(RequestError::NotFound(path.to_string())),
        }
    }
}

/// The query of `GET /v1/streams`: `node`, `sort` and `limit`, each at
/// most once; anything else is refused, so a typo is not silently ignored.
fn streams_query(query: &str) -> Result<StreamsQuery, RequestError> {
    let mut q = StreamsQuery::default();
    let bad = |m: String| Err(RequestError::BadQuery(m));
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "node" if q.node.is_none() => {
                if !crate::config::valid_node_name(v) {
                    return Err(RequestError::BadName(v.to_string()));
                }
                q.node = Some(v.to_string());
            }
            "sort" => match StreamSort::from_name(v) {
                Some(s) => q.sort = s,
                None => return bad(format!("sort={v:?}: expected age or buffered")),
            },
            "limit" if q.limit.is_none() => match v.parse::<usize>() {
                Ok(n) if n >= 1 => q.limit = Some(n),
                _ => {
                    return bad(format!(
                        "limit={v:?}: expected a whole number of at least 1"
                    ))
                }
            },
            _ => {
                return bad(format!(
                    "{k:?} is not a query parameter of /v1/streams (node, sort, limit)"
                ))
            }
        }
    }
    Ok(q)
}

/// Every error answer: `{"error": "..."}` with a 4xx or 5xx code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a human.
    pub error: String,
}

/// `POST /v1/nodes` succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Added {
    /// The node added.
    pub added: String,
}

/// `DELETE /v1/nodes/{name}` succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The node removed (draining, then closed).
    pub removed: String,
}

/// `drain` or `undrain` succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainChanged {
    /// The node.
    pub node: String,
    /// Its state after the change.
    pub state: String,
}

/// `reconnect` succeeded: the new session carries new streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconnected {
    /// The node.
    pub node: String,
    /// Always true.
    pub reconnected: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_parses_back_from_its_method_path_and_body() {
        let spec = NodeSpec {
            name: "node-1".into(),
            address: "10.200.0.2".into(),
            port: Some(2222),
            pod_cidrs: vec!["10.244.1.0/24".into()],
            ..NodeSpec::default()
        };
        for r in [
            Request::Status,
            Request::Streams(StreamsQuery::default()),
            Request::Streams(StreamsQuery {
                node: Some("node-1".into()),
                sort: StreamSort::Buffered,
                limit: Some(5),
            }),
            Request::Health,
            Request::Ready,
            Request::Metrics,
            Request::AddNode(spec),
            Request::RemoveNode("node-1".into()),
            Request::Drain("node-1".into()),
            Request::Undrain("node-1".into()),
            Request::Reconnect("node-1".into()),
            Request::Reload,
        ] {
            let body = r.body().unwrap_or_default();
            let back = Request::parse(r.method().as_str(), &r.path(), &body);
            assert_eq!(back, Ok(r.clone()), "{r:?}");
        }
    }

    #[test]
    fn bad_requests_are_refused_with_their_reason() {
        assert_eq!(
            Request::parse("GET", "/v1/nope", b""),
            Err(RequestError::NotFound("/v1/nope".into()))
        );
        assert_eq!(
            Request::parse("PUT", "/v1/reload", b""),
            Err(RequestError::MethodNotAllowed)
        );
        assert!(matches!(
            Request::parse("POST", "/v1/nodes", b"{not json"),
            Err(RequestError::BadBody(m)) if m.starts_with("body is not JSON")
        ));
        assert!(matches!(
            Request::parse("POST", "/v1/nodes", br#"{"name":"a","address":"b","x":1}"#),
            Err(RequestError::BadBody(m)) if m.contains("unknown field `x`")
        ));
        assert_eq!(
            Request::Drain("a/b".into()).check(),
            Err(RequestError::BadName("a/b".into()))
        );
        assert_eq!(Request::Drain("node-1".into()).check(), Ok(()));
        assert!(matches!(
            Request::parse("GET", "/v1/streams?nod=x", b""),
            Err(RequestError::BadQuery(m)) if m.contains("\"nod\" is not a query parameter")
        ));
        assert!(matches!(
            Request::parse("GET", "/v1/streams?limit=0", b""),
            Err(RequestError::BadQuery(m)) if m.contains("at least 1")
        ));
        assert_eq!(
            Request::parse("GET", "/v1/streams?node=a%2Fb", b""),
            Err(RequestError::BadName("a%2Fb".into()))
        );
        assert_eq!(
            Request::parse("GET", "/v1/status?x=1", b""),
            Ok(Request::Status)
        );
    }
}
