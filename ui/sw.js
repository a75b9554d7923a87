// Parley's service worker: shows the push notifications the server sends while this user is
// offline on every device (PROTOCOL.md §5, "Push notifications"). The payload arrives decrypted
// (the browser holds the subscription's keys); it says who wrote in which chat, and the start of
// the text unless the server is configured to leave it out. The message itself is fetched the
// usual way when the page connects (reconnect sync), so a notification never needs more than this.
//
// Everything shown is set as notification text (never HTML). One notification per chat (`tag`):
// a newer one replaces the older.

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

/** Title and body of a notification from the server's `PushNotification`. */
function describe(n) {
  if (!n || n.type !== "message") return { title: "Parley", body: "New activity", tag: "parley" };
  const title = n.group_name ? `${n.sender_name} @ ${n.group_name}` : n.sender_name || "Parley";
  let body = n.preview;
  if (!body) {
    if (n.media_mime) body = n.media_mime.startsWith("image/") ? "📷 Photo" : "📎 File";
    else body = "New message";
  }
  if (n.count > 1) body += ` (+${n.count - 1} more)`;
  return { title, body, tag: n.conversation_id };
}

self.addEventListener("push", (event) => {
  let n = null;
  try { n = event.data ? event.data.json() : null; } catch { n = null; }
  const { title, body, tag } = describe(n);
  event.waitUntil(self.registration.showNotification(title, {
    body,
    tag,
    renotify: true,
    timestamp: n && n.sent_at_ms,
    data: { conversation_id: n && n.conversation_id },
  }));
});

// A click opens the chat: in a Parley tab already open (it is told which chat), else a new one.
self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const id = (event.notification.data && event.notification.data.conversation_id) || "";
  event.waitUntil((async () => {
    const tabs = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
    for (const tab of tabs) {
      if (new URL(tab.url).origin !== self.location.origin) continue;
      tab.postMessage({ type: "open", conversation_id: id });
      return tab.focus();
    }
    return self.clients.openWindow("/#" + id);
  })());
});
