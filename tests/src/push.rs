//! The far side of Web Push for the tests: a push service on loopback, and the browser behind it.
//!
//! [`PushService`] plays the push service a node sends to (FCM, Mozilla's, Apple's in production):
//! it records each request and answers as scripted. [`Device`] plays the browser: it holds a
//! subscription's private key and auth secret, decrypts a payload as RFC 8291 says, and checks the
//! request's VAPID signature (RFC 8292) against the key the node advertises.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parley_protocol::push::{PushKeys, PushNotification, PushSubscriptionRequest};
use tokio::sync::mpsc;
use warp::Filter;
use web_push_native::jwt_simple::algorithms::{ECDSAP256PublicKeyLike, ES256PublicKey};
use web_push_native::jwt_simple::claims::NoCustomClaims;
use web_push_native::jwt_simple::common::VerificationOptions;
use web_push_native::p256;
use web_push_native::p256::elliptic_curve::sec1::ToEncodedPoint;

/// How long a test waits for a push to arrive.
const T: Duration = Duration::from_secs(15);

/// One request the push service received.
#[derive(Debug)]
pub struct Pushed {
    pub path: String,
    pub headers: warp::http::HeaderMap,
    pub body: Vec<u8>,
}

/// A push service on loopback (see the module doc).
pub struct PushService {
    pub origin: String,
    pub received: mpsc::UnboundedReceiver<Pushed>,
    /// Statuses to answer per path, in order; 201 when none is scripted.
    script: Arc<Mutex<HashMap<String, VecDeque<u16>>>>,
}

impl PushService {
    pub async fn start() -> PushService {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let (tx, received) = mpsc::unbounded_channel();
        let script: Arc<Mutex<HashMap<String, VecDeque<u16>>>> = Arc::default();
        let answers = script.clone();
        let route =
            warp::post().and(warp::path::full()).and(warp::header::headers_cloned()).and(warp::body::bytes()).map(
                move |path: warp::path::FullPath, headers, body: warp::hyper::body::Bytes| {
                    let path = path.as_str().to_string();
                    let status = answers.lock().unwrap().get_mut(&path).and_then(VecDeque::pop_front).unwrap_or(201);
                    let _ = tx.send(Pushed { path, headers, body: body.to_vec() });
                    warp::http::StatusCode::from_u16(status).unwrap()
                },
            );
        tokio::spawn(warp::serve(route).incoming(listener).run());
        PushService { origin, received, script }
    }

    pub fn answer(&self, path: &str, statuses: &[u16]) {
        self.script.lock().unwrap().entry(path.to_string()).or_default().extend(statuses);
    }

    /// The next request to arrive (any path).
    pub async fn next(&mut self) -> Pushed {
        tokio::time::timeout(T, self.received.recv()).await.expect("a push in time").expect("push service running")
    }

    /// The node's config for this service: the only push service it may call.
    pub fn toml(&self) -> String {
        format!("[push]\nallowed_endpoints = [\"{}\"]\ncontact = \"mailto:ops@parley.test\"\n", self.origin)
    }
}

/// A browser's side of one subscription: its keys, and what it registers.
pub struct Device {
    secret: p256::SecretKey,
    auth: [u8; 16],
    pub path: String,
    pub endpoint: String,
}

impl Device {
    pub fn new(service: &PushService, path: &str) -> Device {
        let secret = loop {
            let bytes: Vec<u8> =
                [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()].iter().flat_map(|u| *u.as_bytes()).collect();
            if let Ok(k) = p256::SecretKey::from_slice(&bytes) {
                break k;
            }
        };
        let auth = *uuid::Uuid::new_v4().as_bytes();
        Device { secret, auth, path: path.into(), endpoint: format!("{}{path}", service.origin) }
    }

    pub fn subscription(&self) -> PushSubscriptionRequest {
        let public = self.secret.public_key().to_encoded_point(false);
        PushSubscriptionRequest {
            endpoint: self.endpoint.clone(),
            expiration_time: None,
            keys: PushKeys {
                p256dh: URL_SAFE_NO_PAD.encode(public.as_bytes()),
                auth: URL_SAFE_NO_PAD.encode(self.auth),
            },
        }
    }

    /// Check the request as a push service and a browser would, and return what it says.
    pub fn open(&self, pushed: &Pushed, vapid_key: &str, audience: &str) -> PushNotification {
        assert_eq!(pushed.path, self.path);
        let header = |name: &str| pushed.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        assert_eq!(header("content-encoding"), "aes128gcm");
        assert_eq!(header("urgency"), "high");
        assert_eq!(header("ttl"), (24 * 3600).to_string(), "push.ttl_secs by default");
        let topic = header("topic");
        assert!(topic.len() <= 32 && !topic.is_empty(), "RFC 8030 topic: {topic}");
        // VAPID: `vapid t=<JWT>, k=<key>`, the key the node advertises, the JWT signed by it for
        // this push service's origin.
        let authorization = header("authorization");
        let (t, k) = authorization
            .strip_prefix("vapid t=")
            .and_then(|rest| rest.split_once(", k="))
            .unwrap_or_else(|| panic!("VAPID authorization: {authorization}"));
        assert_eq!(k, vapid_key, "signed with the advertised key");
        let public = ES256PublicKey::from_bytes(&URL_SAFE_NO_PAD.decode(k).unwrap()).unwrap();
        let options = VerificationOptions {
            allowed_audiences: Some(HashSet::from([audience.to_string()])),
            required_subject: Some("mailto:ops@parley.test".into()),
            ..Default::default()
        };
        let claims = public.verify_token::<NoCustomClaims>(t, Some(options)).expect("a valid VAPID JWT");
        let expires = claims.expires_at.expect("exp").as_secs();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(expires > now && expires <= now + 24 * 3600, "exp within 24 h (RFC 8292)");
        serde_json::from_slice(&self.decrypt(pushed)).expect("a PushNotification")
    }

    /// The payload of a push to this device, decrypted as the browser would (RFC 8291).
    pub fn decrypt(&self, pushed: &Pushed) -> Vec<u8> {
        let auth = web_push_native::Auth::clone_from_slice(&self.auth);
        web_push_native::decrypt(pushed.body.clone(), &self.secret, &auth).expect("decrypts for this device")
    }
}
