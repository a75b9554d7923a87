//! Push notifications: a user who is offline everywhere in the cluster gets a Web Push
//! notification (RFC 8030) on each browser or device that turned them on, for new messages of
//! their conversations. The message itself still reaches the device the usual way, by reconnect
//! sync when it connects: a push only tells it there is something to fetch, so a lost push
//! loses no message.
//!
//! **Who sends.** The node that committed the message (the shard's owner) decides, right after
//! the fan-out: every member but the sender whom presence shows offline on every live node gets a
//! [`Job`] here. A recipient online anywhere is reached by the fan-out instead. The check and
//! the fan-out see the same presence, so at a moment of change a user may get both a live message
//! and a notification (harmless), or — going offline in the instant between — neither, until
//! their next message or their next connect (which syncs everything).
//!
//! **Bounded and coalesced.** Jobs wait in one queue per node, keyed by (user, conversation):
//! a message for a pair already waiting updates that job (latest message, `count` + 1) instead
//! of adding one, so a burst into a conversation is one notification, and the queue holds at
//! most [`PushConfig::queue_max`] pairs (more are dropped and counted). [`PushConfig::concurrency`]
//! requests to push services run at once, each with a timeout. The `Topic` header (one per
//! conversation) lets a push service replace an older undelivered notification of the same chat.
//!
//! **What is sent.** The payload ([`PushNotification`], JSON) is encrypted for the subscription's
//! keys (RFC 8291, `aes128gcm`): the push service sees ciphertext only. Requests carry a VAPID
//! signature (RFC 8292) by the cluster's key: the one configured (`PARLEY_PUSH_VAPID_KEY`), or the
//! one the first node generated and stored in the directory, so every node signs alike and a
//! subscription made through one node works through all.
//!
//! **Who may be called.** Only push services in `push.allowed_endpoints`: a subscription's
//! endpoint is a URL the client chose, and the node POSTs to it, so an open list would let any
//! user make the node send requests into its own network.
//!
//! **Reads.** A job reads its user's subscriptions from the directory; a user found without any
//! is remembered for [`NO_SUBSCRIPTION_TTL`], so offline users who never turned notifications on
//! cost a read per interval, not per message.
//!
//! A conversation the user muted (`PUT /v1/conversations/:id/mute`) is skipped until the mute
//! ends; its messages still arrive as usual.
//!
//! **Answers.** 2xx: sent. 404/410: the subscription is gone (the browser unsubscribed or was
//! wiped) and is forgotten. 429 and 5xx, and network errors: retried up to
//! [`ATTEMPTS`] times in all, after `Retry-After` (at most [`MAX_RETRY_AFTER`]) or a back-off.
//! Other answers: failed, logged. Jobs are in memory: a node that stops or dies loses the
//! notifications still queued (never a message).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parley_protocol::error::ErrorCode;
use parley_protocol::push::{endpoint_origin, preview, PushNotification, PushSubscriptionRequest};
use parley_protocol::{ConversationId, MessageId, Seq, UserId};
use parley_storage::{now_ms, Directory, PushSubscriptionRecord};
use tokio::sync::{Notify, Semaphore};
use web_push_native::jwt_simple::algorithms::{ECDSAP256KeyPairLike, ECDSAP256PublicKeyLike, ES256KeyPair};
use web_push_native::jwt_simple::claims::Claims;
use web_push_native::p256;

use crate::config::PushConfig;
use crate::context::NodeContext;
use crate::error::{NodeError, NodeResult};

/// Requests per notification and subscription, the first included.
pub const ATTEMPTS: u32 = 3;

/// Longest `Retry-After` honoured; a push service asking for more is treated as a failure.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long a VAPID signature is valid (RFC 8292 allows at most 24 hours).
const VAPID_VALIDITY_SECS: u64 = 12 * 3600;

/// How long a node remembers that a user has no push subscription, so that a user without any
/// costs one directory read per this interval, not one per message. A subscription made through
/// this node clears it at once; one made through another node is seen within this time — and a
/// user subscribes from a browser that is open, that is while online, when nothing is pushed anyway.
pub const NO_SUBSCRIPTION_TTL: Duration = Duration::from_secs(15);

/// Users remembered as having no subscription, per node; past it the memory is cleared.
const NO_SUBSCRIPTION_MAX: usize = 100_000;

/// The directory key of the cluster's generated VAPID key.
const VAPID_SETTING: &str = "push.vapid_private_key";

/// A notification waiting to be sent: the latest message of one conversation for one user.
#[derive(Clone, Debug)]
pub struct Job {
    pub user: UserId,
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub seq: Seq,
    pub sender: UserId,
    /// The start of the body ([`Push::preview`]), or `None` when notifications carry no text.
    pub preview: Option<String>,
    pub media_mime: Option<String>,
    pub sent_at_ms: i64,
    /// Messages this job stands for.
    pub count: u32,
}

#[derive(Default)]
struct Queue {
    jobs: HashMap<(UserId, ConversationId), Job>,
    order: VecDeque<(UserId, ConversationId)>,
}

/// Counters shown in `/v1/cluster` (`push`), since this process started.
#[derive(Default)]
pub struct PushCounters {
    /// Notifications accepted by a push service (one per subscription).
    pub sent: AtomicU64,
    /// Notifications given up on (refused, or still failing after every attempt).
    pub failed: AtomicU64,
    /// Messages not queued because the queue was full.
    pub dropped: AtomicU64,
    /// Subscriptions forgotten because their push service said they are gone.
    pub gone: AtomicU64,
    /// Notifications not sent because their user muted the conversation.
    pub muted: AtomicU64,
    /// Notifications not sent because their user has no subscription.
    pub unsubscribed: AtomicU64,
}

/// The cluster's VAPID key pair.
struct Vapid {
    key: ES256KeyPair,
    /// The public key as browsers want it (`applicationServerKey`): uncompressed point, base64url.
    public_b64: String,
}

/// A node's push notifications: the queue, the key and the counters (see the module doc).
pub struct Push {
    config: PushConfig,
    queue: Mutex<Queue>,
    wake: Notify,
    vapid: OnceLock<Vapid>,
    /// Users found without a subscription, and when (see [`NO_SUBSCRIPTION_TTL`]).
    unsubscribed: Mutex<HashMap<UserId, std::time::Instant>>,
    pub counters: PushCounters,
}

impl Push {
    pub fn new(config: PushConfig) -> Push {
        Push {
            config,
            queue: Mutex::default(),
            wake: Notify::new(),
            vapid: OnceLock::new(),
            unsubscribed: Mutex::default(),
            counters: Default::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Load the cluster's VAPID key: the configured one, else the directory's (generating it if
    /// this is the first node ever to ask). Called once at start, before the node serves.
    pub async fn init(&self, directory: &dyn Directory) -> NodeResult<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let encoded = match &self.config.vapid_private_key {
            Some(k) => k.clone(),
            None => {
                let fresh = URL_SAFE_NO_PAD.encode(ES256KeyPair::generate().to_bytes());
                directory.setting_or_init(VAPID_SETTING, &fresh).await?
            }
        };
        let key = URL_SAFE_NO_PAD
            .decode(encoded.trim().trim_end_matches('='))
            .ok()
            .and_then(|raw| ES256KeyPair::from_bytes(&raw).ok())
            .ok_or_else(|| NodeError::Actor("the VAPID private key is not a base64url P-256 scalar".into()))?;
        let public_b64 = URL_SAFE_NO_PAD.encode(key.public_key().public_key().to_bytes_uncompressed());
        let _ = self.vapid.set(Vapid { key, public_b64 });
        Ok(())
    }

    /// What a notification shows of `body`: its start, or nothing when `push.preview` is off.
    pub fn preview(&self, body: &str) -> Option<String> {
        self.config.preview.then(|| preview(body))
    }

    /// The `applicationServerKey` browsers subscribe with; `None` when push is off.
    pub fn public_key(&self) -> Option<&str> {
        self.vapid.get().map(|v| v.public_b64.as_str())
    }

    /// Check a browser's subscription: well-formed, to a push service this node may call, with a
    /// public key on the curve.
    pub fn check_subscription(&self, sub: &PushSubscriptionRequest) -> NodeResult<()> {
        sub.validate()?;
        let origin = endpoint_origin(&sub.endpoint)?;
        if !self.allowed(&origin) {
            return Err(NodeError::client(
                ErrorCode::InvalidField,
                format!("endpoint: {origin} is not a push service this server uses (push.allowed_endpoints)"),
            ));
        }
        if decode_keys(&sub.keys.p256dh, &sub.keys.auth).is_none() {
            return Err(NodeError::client(ErrorCode::InvalidField, "keys.p256dh is not a point on P-256"));
        }
        Ok(())
    }

    /// Whether `user` was found without a subscription less than [`NO_SUBSCRIPTION_TTL`] ago.
    fn known_unsubscribed(&self, user: UserId) -> bool {
        let known = self.unsubscribed.lock().unwrap_or_else(|p| p.into_inner());
        known.get(&user).is_some_and(|at| at.elapsed() < NO_SUBSCRIPTION_TTL)
    }

    fn remember_unsubscribed(&self, user: UserId) {
        let mut known = self.unsubscribed.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= NO_SUBSCRIPTION_MAX {
            known.clear();
        }
        known.insert(user, std::time::Instant::now());
    }

    /// `user` registered a subscription through this node: look again at their next message.
    pub fn subscribed(&self, user: UserId) {
        self.unsubscribed.lock().unwrap_or_else(|p| p.into_inner()).remove(&user);
    }

    /// Whether this node may call the push service at `origin` (checked at registration, and
    /// again before every request: the operator may have narrowed the list since).
    fn allowed(&self, origin: &str) -> bool {
        self.config.allowed_endpoints.iter().any(|allowed| origin_allowed(allowed, origin))
    }

    /// Queue a notification for `job.user` (see the module doc: coalesced per conversation,
    /// bounded).
    pub fn enqueue(&self, job: Job) {
        if !self.config.enabled {
            return;
        }
        let key = (job.user, job.conversation_id);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(waiting) = q.jobs.get_mut(&key) {
            if job.seq > waiting.seq {
                let count = waiting.count.saturating_add(job.count);
                *waiting = Job { count, ..job };
            } else {
                waiting.count = waiting.count.saturating_add(job.count);
            }
            return;
        }
        if q.jobs.len() >= self.config.queue_max {
            drop(q);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.jobs.insert(key, job);
        q.order.push_back(key);
        drop(q);
        self.wake.notify_one();
    }

    fn next(&self) -> Option<Job> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let key = q.order.pop_front()?;
        q.jobs.remove(&key)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.counters;
        let queued = self.queue.lock().unwrap_or_else(|p| p.into_inner()).jobs.len();
        serde_json::json!({
            "enabled": self.config.enabled,
            "queued": queued,
            "sent": c.sent.load(Ordering::Relaxed),
            "failed": c.failed.load(Ordering::Relaxed),
            "dropped": c.dropped.load(Ordering::Relaxed),
            "gone": c.gone.load(Ordering::Relaxed),
            "unsubscribed": c.unsubscribed.load(Ordering::Relaxed),
            "muted": c.muted.load(Ordering::Relaxed),
        })
    }
}

/// Whether `origin` (`scheme://host[:port]`, lower case) matches an allowed entry: the same
/// origin, or `scheme://*.suffix` for any host under `suffix`.
fn origin_allowed(allowed: &str, origin: &str) -> bool {
    let allowed = allowed.trim_end_matches('/').to_ascii_lowercase();
    match allowed.split_once("://*.") {
        Some((scheme, suffix)) => origin
            .strip_prefix(&format!("{scheme}://"))
            .is_some_and(|host| host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}"))),
        None => allowed == origin,
    }
}

/// A subscription's keys, decoded: the browser's public key and its auth secret.
fn decode_keys(p256dh: &str, auth: &str) -> Option<(p256::PublicKey, web_push_native::Auth)> {
    let point = URL_SAFE_NO_PAD.decode(p256dh.trim_end_matches('=')).ok()?;
    let public = p256::PublicKey::from_sec1_bytes(&point).ok()?;
    let secret = URL_SAFE_NO_PAD.decode(auth.trim_end_matches('=')).ok()?;
    (secret.len() == 16).then(|| (public, web_push_native::Auth::clone_from_slice(&secret)))
}

/// The node's push worker: takes jobs off the queue and sends each with at most
/// `push.concurrency` in flight. Runs for the life of the node.
pub async fn run(ctx: Arc<NodeContext>) {
    let push = &ctx.push;
    if !push.enabled() {
        return;
    }
    let client = match http_client(&push.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "push notifications are off: no HTTP client");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(push.config.concurrency.max(1)));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let job = loop {
            // Registered before looking, so a job queued in between still wakes us.
            let woken = push.wake.notified();
            if let Some(job) = push.next() {
                break job;
            }
            woken.await;
        };
        let (ctx, client) = (ctx.clone(), client.clone());
        tokio::spawn(async move {
            if let Err(e) = notify(&ctx, &client, job).await {
                tracing::warn!(error = %e, "push notification not sent");
            }
            drop(permit);
        });
    }
}

/// The client for push services: HTTPS (rustls, the Mozilla roots built in), bounded in time, and
/// never following a redirect (a push service has no reason to send one, and following it would
/// take the request somewhere `push.allowed_endpoints` did not allow).
fn http_client(config: &PushConfig) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(config.request_timeout_ms))
        .connect_timeout(Duration::from_millis(config.request_timeout_ms.min(5_000)))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// Send one job to every live subscription of its user.
async fn notify(ctx: &NodeContext, client: &reqwest::Client, job: Job) -> NodeResult<()> {
    let directory = &*ctx.stores.directory;
    if ctx.push.known_unsubscribed(job.user) {
        ctx.push.counters.unsubscribed.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    let subscriptions = directory.push_subscriptions(job.user, now_ms()).await?;
    if subscriptions.is_empty() {
        ctx.push.remember_unsubscribed(job.user);
        ctx.push.counters.unsubscribed.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    if directory.muted(job.user, now_ms()).await?.iter().any(|(c, _)| *c == job.conversation_id) {
        ctx.push.counters.muted.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    let sender_name =
        directory.users_by_id(&[job.sender]).await?.into_iter().next().map(|u| u.username).unwrap_or_default();
    let group_name = if job.conversation_id.is_group() {
        ctx.member_conversation(job.user, job.conversation_id).await.ok().and_then(|c| c.name.clone())
    } else {
        None
    };
    let payload = serde_json::to_vec(&PushNotification {
        kind: "message".into(),
        conversation_id: job.conversation_id,
        message_id: job.message_id,
        seq: job.seq,
        sender_id: job.sender,
        sender_name,
        group_name,
        preview: job.preview.clone(),
        media_mime: job.media_mime.clone(),
        count: job.count,
        sent_at_ms: job.sent_at_ms,
    })
    .map_err(|e| NodeError::Actor(format!("encoding a notification: {e}")))?;
    let topic = URL_SAFE_NO_PAD.encode(job.conversation_id.0.as_bytes());
    for sub in subscriptions {
        deliver(ctx, client, &sub, &payload, &topic).await;
    }
    Ok(())
}

/// What became of one request.
enum Outcome {
    Sent,
    Gone,
    Retry(Duration),
    Failed(String),
}

/// Send `payload` to one subscription, with retries; count and log the outcome.
async fn deliver(
    ctx: &NodeContext,
    client: &reqwest::Client,
    sub: &PushSubscriptionRecord,
    payload: &[u8],
    topic: &str,
) {
    let push = &ctx.push;
    if !endpoint_origin(&sub.endpoint).is_ok_and(|origin| push.allowed(&origin)) {
        // Registered while the list allowed it; it never will be called again, so forget it.
        tracing::info!(user = %sub.user, "forgetting a push subscription to a push service no longer allowed");
        if let Err(e) = ctx.stores.directory.delete_push_subscription(&sub.endpoint, None).await {
            tracing::warn!(error = %e, "forgetting a disallowed push subscription");
        }
        return;
    }
    let mut backoff = Duration::from_secs(1);
    for attempt in 1..=ATTEMPTS {
        let outcome = match request(push, sub, payload, topic) {
            Ok(req) => match client.execute(req).await {
                Ok(res) => classify(res.status().as_u16(), res.headers().get(reqwest::header::RETRY_AFTER), backoff),
                Err(e) => {
                    // Unreachable, timed out, reset: retried like a 5xx (the attempts bound it).
                    tracing::debug!(error = %e, attempt, "push request failed");
                    Outcome::Retry(backoff)
                }
            },
            Err(e) => Outcome::Failed(e),
        };
        match outcome {
            Outcome::Sent => {
                push.counters.sent.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Outcome::Gone => {
                push.counters.gone.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = ctx.stores.directory.delete_push_subscription(&sub.endpoint, None).await {
                    tracing::warn!(error = %e, "forgetting a gone push subscription");
                }
                return;
            }
            Outcome::Retry(wait) if attempt < ATTEMPTS => {
                tokio::time::sleep(wait).await;
                backoff *= 4;
            }
            Outcome::Retry(_) => break,
            Outcome::Failed(why) => {
                tracing::warn!(user = %sub.user, reason = %why, "push service refused a notification");
                break;
            }
        }
    }
    push.counters.failed.fetch_add(1, Ordering::Relaxed);
}

fn classify(status: u16, retry_after: Option<&reqwest::header::HeaderValue>, backoff: Duration) -> Outcome {
    match status {
        200..=299 => Outcome::Sent,
        404 | 410 => Outcome::Gone,
        429 | 500..=599 => {
            let asked = retry_after.and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
            match asked.map(Duration::from_secs) {
                Some(wait) if wait > MAX_RETRY_AFTER => Outcome::Failed(format!("{status}, retry after {wait:?}")),
                Some(wait) => Outcome::Retry(wait),
                None => Outcome::Retry(backoff),
            }
        }
        other => Outcome::Failed(format!("status {other}")),
    }
}

/// The HTTP request for one notification to one subscription: the payload encrypted for its keys
/// (RFC 8291), `TTL`, `Urgency`, `Topic`, and the VAPID `Authorization` (RFC 8292).
fn request(push: &Push, sub: &PushSubscriptionRecord, payload: &[u8], topic: &str) -> Result<reqwest::Request, String> {
    let vapid = push.vapid.get().ok_or("no VAPID key")?;
    let (public, auth) = decode_keys(&sub.p256dh, &sub.auth).ok_or("stored keys do not decode")?;
    let uri: http::Uri = sub.endpoint.parse().map_err(|e| format!("endpoint: {e}"))?;
    let mut req = web_push_native::WebPushBuilder::new(uri, public, auth)
        .with_valid_duration(Duration::from_secs(push.config.ttl_secs))
        .build(payload.to_vec())
        .map_err(|e| format!("encrypting: {e}"))?;
    // The audience is the endpoint's origin, port included (RFC 8292 §2; the library's own VAPID
    // helper leaves the port out).
    let audience = endpoint_origin(&sub.endpoint).map_err(|e| e.to_string())?;
    let claims = Claims::create(web_push_native::jwt_simple::prelude::Duration::from_secs(VAPID_VALIDITY_SECS))
        .with_audience(audience)
        .with_subject(push.config.contact.clone());
    let token = vapid.key.sign(claims).map_err(|e| format!("signing: {e}"))?;
    let headers = req.headers_mut();
    let value = |v: String| http::HeaderValue::try_from(v).map_err(|e| e.to_string());
    headers.insert(http::header::AUTHORIZATION, value(format!("vapid t={token}, k={}", vapid.public_b64))?);
    headers.insert("urgency", http::HeaderValue::from_static("high"));
    headers.insert("topic", value(topic.to_string())?);
    reqwest::Request::try_from(req).map_err(|e| format!("request: {e}"))
}

/// A subscription to store from a browser's registration.
pub fn record(sub: &PushSubscriptionRequest, user: UserId, token_hash: String) -> PushSubscriptionRecord {
    PushSubscriptionRecord {
        endpoint: sub.endpoint.clone(),
        user,
        token_hash,
        p256dh: sub.keys.p256dh.trim_end_matches('=').to_string(),
        auth: sub.keys.auth.trim_end_matches('=').to_string(),
        created_at_ms: now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Push services are HTTPS: a request to an `https://` endpoint must open a TLS handshake
    /// (a client built without TLS refuses the URL before connecting at all).
    #[tokio::test]
    async fn the_client_speaks_https() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let first_bytes = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 3];
            socket.read_exact(&mut head).await.unwrap();
            head
        });
        let client = http_client(&PushConfig { request_timeout_ms: 2_000, ..Default::default() }).unwrap();
        let _ = client.post(format!("https://{addr}/push")).send().await;
        let head = tokio::time::timeout(Duration::from_secs(5), first_bytes).await.expect("a connection").unwrap();
        assert_eq!(head[..2], [0x16, 0x03], "a TLS handshake record: {head:?}");
    }

    #[test]
    fn allowed_origins_match_exactly_or_by_suffix() {
        assert!(origin_allowed("https://fcm.googleapis.com", "https://fcm.googleapis.com"));
        assert!(origin_allowed("https://fcm.googleapis.com/", "https://fcm.googleapis.com"));
        assert!(!origin_allowed("https://fcm.googleapis.com", "https://fcm.googleapis.com.evil.example"));
        assert!(!origin_allowed("https://fcm.googleapis.com", "http://fcm.googleapis.com"));
        assert!(origin_allowed("https://*.notify.windows.com", "https://wns2-par02p.notify.windows.com"));
        assert!(!origin_allowed("https://*.notify.windows.com", "https://notify.windows.com"));
        assert!(!origin_allowed("https://*.notify.windows.com", "https://evilnotify.windows.com"));
        assert!(!origin_allowed("https://*.notify.windows.com", "http://a.notify.windows.com"));
        assert!(origin_allowed("http://127.0.0.1:9000", "http://127.0.0.1:9000"));
        assert!(!origin_allowed("http://127.0.0.1:9000", "http://127.0.0.1:9001"));
    }

    fn job(user: UserId, conversation_id: ConversationId, seq: Seq) -> Job {
        Job {
            user,
            conversation_id,
            message_id: MessageId(uuid::Uuid::new_v4()),
            seq,
            sender: UserId::random(),
            preview: Some(format!("message {seq}")),
            media_mime: None,
            sent_at_ms: 0,
            count: 1,
        }
    }

    #[test]
    fn a_burst_into_one_conversation_is_one_notification_and_the_queue_is_bounded() {
        let push = Push::new(PushConfig { queue_max: 2, ..Default::default() });
        let (ann, ben, cat) = (UserId::random(), UserId::random(), UserId::random());
        let chat = ConversationId(uuid::Uuid::new_v4());
        for seq in 1..=3 {
            push.enqueue(job(ann, chat, seq));
        }
        push.enqueue(job(ben, chat, 3));
        push.enqueue(job(cat, chat, 3));
        push.enqueue(job(ann, chat, 4));
        assert_eq!(push.counters.dropped.load(Ordering::Relaxed), 1, "cat: the queue holds 2 pairs");
        let first = push.next().unwrap();
        assert_eq!((first.user, first.seq, first.count, first.preview.as_deref()), (ann, 4, 4, Some("message 4")));
        assert_eq!(push.next().map(|j| (j.user, j.count)), Some((ben, 1)));
        assert!(push.next().is_none());
    }

    #[test]
    fn a_user_without_subscriptions_is_remembered_until_they_subscribe_here() {
        let push = Push::new(PushConfig::default());
        let (ann, ben) = (UserId::random(), UserId::random());
        assert!(!push.known_unsubscribed(ann));
        push.remember_unsubscribed(ann);
        assert!(push.known_unsubscribed(ann) && !push.known_unsubscribed(ben));
        push.subscribed(ann);
        assert!(!push.known_unsubscribed(ann), "a subscription through this node is seen at once");
    }

    #[test]
    fn answers_are_classified_as_rfc_8030_says() {
        let b = Duration::from_secs(1);
        assert!(matches!(classify(201, None, b), Outcome::Sent));
        assert!(matches!(classify(410, None, b), Outcome::Gone));
        assert!(matches!(classify(404, None, b), Outcome::Gone));
        assert!(matches!(classify(503, None, b), Outcome::Retry(d) if d == b));
        let soon = http::HeaderValue::from_static("7");
        assert!(matches!(classify(429, Some(&soon), b), Outcome::Retry(d) if d == Duration::from_secs(7)));
        let late = http::HeaderValue::from_static("3600");
        assert!(matches!(classify(429, Some(&late), b), Outcome::Failed(_)));
        assert!(matches!(classify(400, None, b), Outcome::Failed(_)));
        assert!(matches!(classify(413, None, b), Outcome::Failed(_)));
    }
}
