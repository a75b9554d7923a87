//! The WebSocket upgrade as our own warp filter, so that the node chooses tungstenite's
//! [`WebSocketConfig`]. warp 0.4's `ws()` builds the stream with the default config and has no
//! setter for `read_buffer_size` or `write_buffer_size`: the 128 KiB read buffer it allocates (and
//! zero-fills) for every connection was most of an idle session's memory.
//!
//! The checks are those of warp's `ws()` (RFC 6455 §4.2.1): `GET`; `connection` lists `upgrade`;
//! `upgrade: websocket`; `sec-websocket-version: 13`; a `sec-websocket-key`. A request that fails
//! one is refused with `400 invalid_field` naming the header (warp answered these with a generic
//! rejection). The answer is `101 Switching Protocols` with `sec-websocket-accept`, and a spawned
//! task waits for hyper to hand over the connection and builds the socket on it.

use std::future::Future;

use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use parley_protocol::ErrorCode;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::{Filter, Rejection};

use crate::error::NodeError;

/// A server-side WebSocket on an upgraded HTTP/1.1 connection.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// A request that passed the handshake checks; [`Upgrade::into_response`] finishes it.
pub struct Upgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Matches a valid WebSocket upgrade request (the path is matched before, by the route).
pub fn websocket() -> impl Filter<Extract = (Upgrade,), Error = Rejection> + Clone {
    warp::get().and(warp::header::headers_cloned()).and(warp::ext::optional::<OnUpgrade>()).and_then(
        |headers: HeaderMap, on_upgrade: Option<OnUpgrade>| async move {
            let refuse = |message: &str| Rejection::from(NodeError::client(ErrorCode::InvalidField, message));
            let key = check_handshake(&headers).map_err(refuse)?;
            let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
                .map_err(|_| refuse("invalid sec-websocket-key"))?;
            // hyper puts this in the extensions of an HTTP/1.1 request that asks for an upgrade.
            let on_upgrade = on_upgrade.ok_or_else(|| refuse("this connection cannot be upgraded (HTTP/1.1 only)"))?;
            Ok::<_, Rejection>(Upgrade { accept, on_upgrade })
        },
    )
}

/// The handshake checks of RFC 6455 §4.2.1 (the method is checked by the filter): the client's
/// key, or what is wrong with the request.
pub fn check_handshake(headers: &HeaderMap) -> Result<&HeaderValue, &'static str> {
    let lists_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if !lists_upgrade {
        return Err("a WebSocket upgrade needs `connection: upgrade`");
    }
    let is = |name: header::HeaderName, want: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim().eq_ignore_ascii_case(want))
    };
    if !is(header::UPGRADE, "websocket") {
        return Err("a WebSocket upgrade needs `upgrade: websocket`");
    }
    if !is(header::SEC_WEBSOCKET_VERSION, "13") {
        return Err("a WebSocket upgrade needs `sec-websocket-version: 13`");
    }
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key) if !key.is_empty() => Ok(key),
        _ => Err("a WebSocket upgrade needs a `sec-websocket-key`"),
    }
}

impl Upgrade {
    /// Answer `101 Switching Protocols` and, once hyper hands the connection over, run `on_socket`
    /// on a WebSocket with `config`. If the upgrade fails (the client went away), `on_socket` is
    /// dropped without running.
    pub fn into_response<F, U>(self, config: WebSocketConfig, on_socket: F) -> warp::reply::Response
    where
        F: FnOnce(Socket) -> U + Send + 'static,
        U: Future<Output = ()> + Send + 'static,
    {
        let Upgrade { accept, on_upgrade } = self;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let socket =
                        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
                    // A task of its own rather than awaited here: this task's future would hold the
                    // connection's whole life in a cell sized for the handshake's state too (the
                    // config, the upgrade, the stream being built) — paid by every idle session.
                    tokio::spawn(on_socket(socket));
                }
                Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
            }
        });
        let mut response = warp::reply::Response::default();
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    const VALID: [(&str, &str); 4] = [
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "WebSocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn a_valid_handshake_yields_the_key_and_its_rfc_accept_value() {
        let headers = request(&VALID);
        let key = check_handshake(&headers).unwrap();
        // The example of RFC 6455 §1.3.
        assert_eq!(derive_accept_key(key.as_bytes()), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn each_missing_or_wrong_header_is_named() {
        for (i, (name, _)) in VALID.iter().enumerate() {
            let without: Vec<_> = VALID.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, p)| *p).collect();
            let err = check_handshake(&request(&without)).unwrap_err();
            assert!(err.contains(&format!("`{name}")), "without {name}: {err}");
        }
        let mut wrong = VALID;
        wrong[2] = ("sec-websocket-version", "8");
        assert!(check_handshake(&request(&wrong)).unwrap_err().contains("sec-websocket-version"));
        wrong = VALID;
        wrong[0] = ("connection", "keep-alive, upgrades");
        assert!(check_handshake(&request(&wrong)).unwrap_err().contains("connection"));
        wrong = VALID;
        wrong[3] = ("sec-websocket-key", "");
        assert!(check_handshake(&request(&wrong)).unwrap_err().contains("sec-websocket-key"));
    }

    #[test]
    fn connection_tokens_may_be_spread_over_several_headers() {
        let mut headers = request(&VALID[1..]);
        headers.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.append(header::CONNECTION, HeaderValue::from_static("UPGRADE"));
        assert!(check_handshake(&headers).is_ok());
    }
}
