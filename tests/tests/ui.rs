//! The browser UI end to end: real headless Chromium (through chromedriver) on the pages that real
//! `parley` nodes serve, one browser per person, each with its own profile. What the tests read is
//! what a person sees — the DOM the UI renders from the server's frames — never the UI's internals.
//!
//! - Two people on two nodes of a Postgres-backed cluster: sign-up, a chat, live delivery and read
//!   ticks across nodes, typing, then a kill -9 of one person's node: the cluster view shows the node down
//!   and its shards moving, the person's browser fails over to the live node and still gets the
//!   next message, and a reload shows the whole history with its read ticks.
//! - One node on the embedded store: refusals are shown and change nothing (wrong password, a
//!   taken username, an oversized message), message text is never interpreted as HTML, and groups
//!   are created, renamed, managed (members removed and added by the owner), used and left from
//!   the UI.
//! - Notifications: the 🔔 control and its failure when the browser's push service is out of
//!   reach, the service worker, and the notifications it shows for pushes the server really sent.

use parley_tests::browser::{Browser, Driver};
use parley_tests::cluster::TestCluster;
use parley_tests::node::{NodeOptions, NodeProcess, Storage};
use parley_tests::postgres::TestPostgres;
use parley_tests::TempDir;
use serde_json::{json, Value};

const PASSWORD: &str = "correct-horse-battery";

fn unique(name: &str) -> String {
    format!("{name}{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

/// Fills the sign-in form and presses `button` (`#login` or `#register`).
/// Picks the PNG of `arguments[0]` (base64) in the composer's file input, as a user would.
const ATTACH_PNG: &str = "const png = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
     const dt = new DataTransfer();
     dt.items.add(new File([png], 'beach.png', { type: 'image/png' }));
     const input = document.getElementById('attach');
     input.files = dt.files;
     input.dispatchEvent(new Event('change'));";

/// Messages of the open chat: another's, and one's own once acked.
const THEIRS: &str = "#messages li.msg.theirs";
const MINE_ACKED: &str = "#messages li.msg.mine[data-seq]";

/// Waits until the message captioned `caption` among the `css` messages shows `ATTACH_PNG`'s
/// picture, decoded (3×2, named in its alt text), from the thumbnail the server made of it.
async fn see_photo(b: &Browser, what: &str, css: &str, caption: &str) -> anyhow::Result<()> {
    let picture = "const li = [...document.querySelectorAll(arguments[0])]
             .find((li) => li.querySelector('.body').textContent === arguments[1]);
         const img = li && li.querySelector('img.media-img');
         return img && img.complete && img.naturalWidth === 3 && img.naturalHeight === 2 && img.alt === 'beach.png'
             && img.dataset.shows === 'thumbnail';";
    b.wait_until(what, picture, vec![json!(css), json!(caption)]).await
}

/// Loads `url` again (the browser keeps the token) and waits until the chat view is connected.
async fn reload(b: &Browser, url: &str) -> anyhow::Result<()> {
    b.goto(url).await?;
    b.wait_until(
        "the chat view after a reload",
        "return document.getElementById('conn').dataset.state === 'online';",
        vec![],
    )
    .await
}

async fn submit_auth(b: &Browser, username: &str, password: &str, button: &str) -> anyhow::Result<()> {
    b.type_into("#username", username).await?;
    b.type_into("#password", password).await?;
    b.click(button).await
}

/// Registers through the form and waits until the chat view is online; returns the serving node.
async fn sign_up(b: &Browser, username: &str) -> anyhow::Result<String> {
    submit_auth(b, username, PASSWORD, "#register").await?;
    let node = b
        .wait_for(
            "the chat view, online",
            "const c = document.getElementById('conn');
             return !document.getElementById('chat-view').hidden && c.dataset.state === 'online'
                 && document.getElementById('node').textContent;",
            vec![],
        )
        .await?;
    Ok(node.as_str().unwrap_or_default().trim_start_matches("via ").to_string())
}

/// Ticks `username` in People (for a new group, or to add to one).
async fn tick_person(b: &Browser, username: &str) -> anyhow::Result<()> {
    b.eval(
        "document.querySelector(`#people li[data-username=\"${arguments[0]}\"] input[type=checkbox]`).click();",
        vec![json!(username)],
    )
    .await
    .map(|_| ())
}

/// Opens the direct chat with `username` from the People list.
async fn open_chat_with(b: &Browser, username: &str) -> anyhow::Result<()> {
    b.click("#refresh-people").await?;
    b.wait_for(
        "the person in People",
        "return document.querySelector(`#people li[data-username=\"${arguments[0]}\"] .open-chat`);",
        vec![json!(username)],
    )
    .await?;
    b.click(&format!("#people li[data-username=\"{username}\"] .open-chat")).await?;
    b.wait_for(
        "the chat to open",
        "return document.getElementById('thread-title').textContent === arguments[0];",
        vec![json!(username)],
    )
    .await?;
    Ok(())
}

/// Types `text` into the composer and sends it; waits for the server's ack (the pending bubble
/// becomes a message with a seq and a tick).
async fn send_text(b: &Browser, text: &str) -> anyhow::Result<u64> {
    b.type_into("#text", text).await?;
    b.click("#send").await?;
    let seq = b
        .wait_for(
            "the message to be acked",
            "const m = [...document.querySelectorAll('#messages li.msg.mine[data-seq]')]
                 .find((li) => li.querySelector('.body').textContent === arguments[0]);
             return m ? Number(m.dataset.seq) : null;",
            vec![json!(text)],
        )
        .await?;
    Ok(seq.as_u64().unwrap_or_default())
}

/// Waits until the open chat shows a message from someone else with this text.
async fn see_message(b: &Browser, text: &str) -> anyhow::Result<()> {
    b.wait_until(
        "a message to appear",
        "return [...document.querySelectorAll('#messages li.msg.theirs .body')].some((e) => e.textContent === arguments[0]);",
        vec![json!(text)],
    )
    .await
}

/// The tick state of my message `seq` in the open chat.
async fn tick_of(b: &Browser, seq: u64, want: &str) -> anyhow::Result<()> {
    b.wait_until(
        &format!("message {seq} to show `{want}`"),
        "const m = document.querySelector(`#messages li.msg.mine[data-seq=\"${arguments[0]}\"]`);
         return m && m.dataset.state === arguments[1];",
        vec![json!(seq), json!(want)],
    )
    .await
}

/// Opens a conversation from the chat list by its visible title.
async fn open_conversation_titled(b: &Browser, title: &str) -> anyhow::Result<()> {
    b.wait_for(
        "the conversation in the list",
        "return [...document.querySelectorAll('#conversations li .title')].some((e) => e.textContent === arguments[0]);",
        vec![json!(title)],
    )
    .await?;
    b.eval(
        "[...document.querySelectorAll('#conversations li')].find((li) => li.querySelector('.title').textContent === arguments[0]).click();",
        vec![json!(title)],
    )
    .await?;
    b.wait_until(
        "the chat to open",
        "return document.getElementById('thread-title').textContent === arguments[0];",
        vec![json!(title)],
    )
    .await
}

/// A 3×2 RGB PNG (red, green, blue columns), base64.
const TINY_PNG: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAMAAAACCAIAAAASFvFNAAAAEElEQVR4nGP4z8DAAMFwFgA72AX73hA3ZQAAAABJRU5ErkJggg==";

async fn texts(b: &Browser, css: &str) -> anyhow::Result<Vec<String>> {
    let v = b
        .eval("return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent);", vec![json!(css)])
        .await?;
    Ok(v.as_array().map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_chat_across_nodes_and_survive_a_node_kill() {
    const SHARDS: u16 = 8;
    let pg = TestPostgres::start().await.unwrap();
    let mut cluster = TestCluster::start(2, 2, &Storage::Postgres(pg.url().into()), SHARDS, 3_000).await.unwrap();
    let urls: Vec<String> = cluster.nodes.nodes.iter().map(|n| format!("http://{}/", n.http)).collect();
    let url = |i: usize| urls[i].clone();
    let driver = Driver::start().await.unwrap();
    let alice = driver.browser("alice").await.unwrap();
    let bob = driver.browser("bob").await.unwrap();
    let (alice_name, bob_name) = (unique("alice"), unique("bob"));

    // Each signs up on a different node.
    alice.goto(&url(0)).await.unwrap();
    bob.goto(&url(1)).await.unwrap();
    assert_eq!(sign_up(&alice, &alice_name).await.unwrap(), cluster.name(0));
    assert_eq!(sign_up(&bob, &bob_name).await.unwrap(), cluster.name(1));

    // Alice writes first; Bob's list shows the new chat with one unread message, live. Bob,
    // signed in on the other node, shows as online in the chat's header.
    open_chat_with(&alice, &bob_name).await.unwrap();
    alice
        .wait_for(
            "Bob online (on n2)",
            "return document.getElementById('thread-presence').textContent === 'online';",
            vec![],
        )
        .await
        .unwrap();
    let first = send_text(&alice, "hello bob").await.unwrap();
    assert_eq!(first, 1);
    bob.wait_for(
        "an unread badge on the new chat",
        "const li = [...document.querySelectorAll('#conversations li')].find((li) => li.querySelector('.title').textContent === arguments[0]);
         return li && li.querySelector('.unread') && li.querySelector('.unread').textContent === '1';",
        vec![json!(alice_name)],
    )
    .await
    .unwrap();
    // Delivered to Bob's device (two ticks) before he opens it; read (blue) once he has.
    tick_of(&alice, first, "delivered").await.unwrap();
    open_conversation_titled(&bob, &alice_name).await.unwrap();
    see_message(&bob, "hello bob").await.unwrap();
    tick_of(&alice, first, "read").await.unwrap();
    let badge =
        bob.eval("return document.querySelectorAll('#conversations li .unread').length;", vec![]).await.unwrap();
    assert_eq!(badge, json!(0), "opening the chat clears its unread badge");

    // Bob starts typing: Alice (on the other node) sees it in the open chat; his message ends it.
    bob.type_into("#text", "hi").await.unwrap();
    alice
        .wait_for(
            "Bob's typing indicator",
            "return document.getElementById('typing').textContent === arguments[0] + ' is typing…';",
            vec![json!(bob_name)],
        )
        .await
        .unwrap();
    // Bob answers; Alice's open chat shows it without a click.
    let reply = send_text(&bob, "hi alice").await.unwrap();
    assert_eq!(reply, 2);
    see_message(&alice, "hi alice").await.unwrap();
    let typing = alice.eval("return document.getElementById('typing').textContent;", vec![]).await.unwrap();
    assert_eq!(typing, json!(""), "a message from Bob ends his typing indicator");

    // Alice sends a photo with a caption, picked through the composer's file input (a 3×2 PNG):
    // uploaded to her node, it shows as a decoded picture in Bob's chat on the other node, and in
    // hers once acked; the chat list previews it as a photo.
    alice.type_into("#text", "our beach").await.unwrap();
    alice.eval(ATTACH_PNG, vec![json!(TINY_PNG)]).await.unwrap();
    see_photo(&bob, "Alice's photo, decoded, on the other node", THEIRS, "our beach").await.unwrap();
    see_photo(&alice, "her own photo, acked", MINE_ACKED, "our beach").await.unwrap();
    let previews = texts(&bob, "#conversations li .preview").await.unwrap();
    assert_eq!(previews, vec!["📷 our beach".to_string()], "the chat list previews the photo");

    // Alice watches the cluster: both nodes up, every shard owned.
    alice.click("#tab-cluster").await.unwrap();
    alice
        .wait_for(
            "two live nodes and an owner for every shard",
            "const rows = [...document.querySelectorAll('#members tr[data-node]')];
             const shards = [...document.querySelectorAll('#shards .shard')];
             return rows.length === 2 && rows.every((r) => r.dataset.alive === 'true')
                 && shards.length === arguments[0] && shards.every((s) => s.dataset.owner !== '');",
            vec![json!(SHARDS)],
        )
        .await
        .unwrap();

    // Bob's node dies. Alice's cluster view shows it down and every shard taken over by her node,
    // with new lease epochs; the change log says so.
    let (n1, n2) = (cluster.name(0).to_string(), cluster.name(1).to_string());
    let epochs_before = alice
        .eval(
            "return Object.fromEntries([...document.querySelectorAll('#shards .shard')].map((s) => [s.dataset.shard, Number(s.dataset.epoch)]));",
            vec![],
        )
        .await
        .unwrap();
    cluster.nodes.nodes[1].kill9();
    alice
        .wait_for(
            "the killed node down and its shards moved",
            "const down = document.querySelector(`#members tr[data-node=\"${arguments[1]}\"]`);
             const shards = [...document.querySelectorAll('#shards .shard')];
             return down && down.dataset.alive === 'false' && shards.every((s) => s.dataset.owner === arguments[0]);",
            vec![json!(n1), json!(n2)],
        )
        .await
        .unwrap();
    let moved = alice
        .eval(
            "const before = arguments[0], owner = arguments[1];
             return [...document.querySelectorAll('#shards .shard')].filter((s) => Number(s.dataset.epoch) > before[s.dataset.shard]).length;",
            vec![epochs_before, json!(n1)],
        )
        .await
        .unwrap();
    assert!(moved.as_u64().unwrap_or(0) >= 1, "the shards the dead node held were re-leased with higher epochs");
    let log = texts(&alice, "#cluster-log li").await.unwrap().join("\n");
    assert!(log.contains(&format!("{n2} is down")), "the change log names the dead node:\n{log}");
    assert!(log.contains("moved"), "the change log shows the shards moving:\n{log}");

    // Bob's browser fails over to the live node on its own, and the next message reaches him there.
    bob.wait_for(
        "Bob's socket to fail over",
        "return document.getElementById('conn').dataset.state === 'online' && document.getElementById('node').textContent === 'via ' + arguments[0];",
        vec![json!(n1)],
    )
    .await
    .unwrap();
    alice.click("#tab-chat").await.unwrap();
    let third = send_text(&alice, "still there?").await.unwrap();
    assert_eq!(third, 4);
    see_message(&bob, "still there?").await.unwrap();
    tick_of(&alice, third, "read").await.unwrap();

    // Bob's page came from the dead node, yet its HTTP calls follow his socket to the live one
    // (cross-origin): he sends a photo — an upload, then a download to show it — and mutes the chat.
    bob.type_into("#text", "from the other node").await.unwrap();
    bob.eval(ATTACH_PNG, vec![json!(TINY_PNG)]).await.unwrap();
    see_photo(&bob, "his photo, uploaded through the live node and acked", MINE_ACKED, "from the other node")
        .await
        .unwrap();
    see_photo(&alice, "Bob's photo", THEIRS, "from the other node").await.unwrap();
    bob.click("#mute").await.unwrap();
    bob.wait_for(
        "the chat muted through the live node",
        "const b = document.getElementById('mute'); return !b.hidden && b.dataset.muted === 'true';",
        vec![],
    )
    .await
    .unwrap();

    // Everything acknowledged is durable: a reload (token kept by the browser) shows it all.
    reload(&alice, &url(0)).await.unwrap();
    open_conversation_titled(&alice, &bob_name).await.unwrap();
    alice
        .wait_for(
            "the whole history",
            "return document.querySelectorAll('#messages li.msg[data-seq]').length === 5;",
            vec![],
        )
        .await
        .unwrap();
    let bodies = texts(&alice, "#messages li.msg .body").await.unwrap();
    assert_eq!(bodies, ["hello bob", "hi alice", "our beach", "still there?", "from the other node"]);
    see_photo(&alice, "the photo after a reload", MINE_ACKED, "our beach").await.unwrap();
    // Receipts are not replayed, yet her messages keep their read ticks: the list carries Bob's
    // read position.
    tick_of(&alice, first, "read").await.unwrap();
    tick_of(&alice, third, "read").await.unwrap();

    // "My uploads" lists her photo and what it takes of her quota.
    // Opened as a click on its title does (a WebDriver click lands on the summary's centre, which
    // is its ↻ button); opening is what loads the list.
    alice.eval("document.getElementById('uploads-box').open = true;", vec![]).await.unwrap();
    let uploads = "return document.getElementById('uploads-usage').textContent === arguments[0]
                      && document.querySelectorAll('#uploads li').length === arguments[1];";
    alice.wait_for("her one upload", uploads, vec![json!("1 upload · 73 B of 1.0 GB"), json!(1)]).await.unwrap();

    // Alice deletes her photo (🗑, only on her own): her chat shows it gone at once, and her
    // uploads no longer list it; Bob's photo keeps its picture, and after another reload the
    // server's 404 shows hers gone too.
    let own_photo = format!("{MINE_ACKED} .delete-media");
    assert_eq!(texts(&alice, &own_photo).await.unwrap().len(), 1, "a 🗑 on her own photo");
    assert!(texts(&alice, &format!("{THEIRS} .delete-media")).await.unwrap().is_empty(), "none on Bob's");
    alice.click(&own_photo).await.unwrap();
    let gone = "return [...document.querySelectorAll('#messages .media-gone')].map((e) => e.textContent).join('|')
                  === arguments[0];";
    let want = vec![json!("🚫 beach.png (73 B) is no longer available")];
    alice.wait_for("her photo gone", gone, want.clone()).await.unwrap();
    alice.wait_for("no uploads left", uploads, vec![json!("0 uploads · 0 B of 1.0 GB"), json!(0)]).await.unwrap();
    see_photo(&alice, "Bob's photo, not hers", THEIRS, "from the other node").await.unwrap();
    reload(&alice, &url(0)).await.unwrap();
    open_conversation_titled(&alice, &bob_name).await.unwrap();
    alice.wait_for("the deleted photo after a reload (a 404)", gone, want).await.unwrap();

    alice.close().await;
    bob.close().await;
    cluster.nodes.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_escaping_and_groups_in_the_browser() {
    let dir = TempDir::new("parley-ui-store");
    let node = NodeProcess::start(NodeOptions::new("n1", Storage::Embedded(dir.path().join("data")))).await.unwrap();
    let url = format!("http://{}/", node.http);
    let driver = Driver::start().await.unwrap();
    let alice = driver.browser("alice").await.unwrap();
    let bob = driver.browser("bob").await.unwrap();
    let (alice_name, bob_name) = (unique("alice"), unique("bob"));

    // A wrong password is refused with the server's code, and nobody is signed in.
    alice.goto(&url).await.unwrap();
    submit_auth(&alice, &alice_name, "wrong-password-1", "#login").await.unwrap();
    alice
        .wait_for(
            "the refusal",
            "return document.getElementById('auth-error').textContent.includes('bad_credentials');",
            vec![],
        )
        .await
        .unwrap();
    let signed_in = alice
        .eval(
            "return !document.getElementById('chat-view').hidden || localStorage.getItem('parley.auth') !== null;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(signed_in, json!(false));
    sign_up(&alice, &alice_name).await.unwrap();

    // A taken username is refused too.
    bob.goto(&url).await.unwrap();
    submit_auth(&bob, &alice_name, PASSWORD, "#register").await.unwrap();
    bob.wait_for(
        "the refusal",
        "return document.getElementById('auth-error').textContent.includes('username_taken');",
        vec![],
    )
    .await
    .unwrap();
    sign_up(&bob, &bob_name).await.unwrap();

    // Markup in a message is shown as text on both sides; no element is made from it.
    let markup = r#"<img src=x onerror="window.pwned=1"><b>bold?</b>"#;
    open_chat_with(&alice, &bob_name).await.unwrap();
    send_text(&alice, markup).await.unwrap();
    open_conversation_titled(&bob, &alice_name).await.unwrap();
    see_message(&bob, markup).await.unwrap();
    for b in [&alice, &bob] {
        let injected = b
            .eval("return window.pwned === 1 || document.querySelector('#messages img, #messages b, #conversations img') !== null;", vec![])
            .await
            .unwrap();
        assert_eq!(injected, json!(false), "{}: message text was interpreted as HTML", b.name);
    }

    // An oversized message is refused with the limit named, and nothing is sent.
    let before = alice.eval("return document.querySelectorAll('#messages li.msg').length;", vec![]).await.unwrap();
    alice.eval("document.getElementById('text').value = 'x'.repeat(16 * 1024 + 1);", vec![]).await.unwrap();
    alice.click("#send").await.unwrap();
    alice
        .wait_for(
            "the refusal",
            "return document.getElementById('thread-error').textContent.includes('body_too_large');",
            vec![],
        )
        .await
        .unwrap();
    let after = alice.eval("return document.querySelectorAll('#messages li.msg').length;", vec![]).await.unwrap();
    assert_eq!(before, after, "an oversized message must not be queued or shown");
    let client = node.client();
    let token = client.login(&alice_name, PASSWORD).await.unwrap().token;
    let convs = client.conversations(&token).await.unwrap();
    assert_eq!(convs.iter().map(|c| c.last_seq).collect::<Vec<_>>(), [1], "only the first message is stored");

    // Alice makes a group with Bob; he sees it by name, and her message in it, with her name.
    tick_person(&alice, &bob_name).await.unwrap();
    alice.eval("document.getElementById('group-box').open = true;", vec![]).await.unwrap();
    alice.type_into("#group-name", "climbing").await.unwrap();
    alice.click("#create-group").await.unwrap();
    alice
        .wait_for(
            "the new group to open",
            "return document.getElementById('thread-title').textContent === 'climbing';",
            vec![],
        )
        .await
        .unwrap();
    let members = alice.eval("return document.getElementById('thread-members').textContent;", vec![]).await.unwrap();
    let members = members.as_str().unwrap_or_default();
    assert!(
        members.contains(&format!("{alice_name} (owner)")) && members.contains(&bob_name),
        "members shown: {members}"
    );
    let asked = send_text(&alice, "who's in on saturday?").await.unwrap();
    open_conversation_titled(&bob, "climbing").await.unwrap();
    see_message(&bob, "who's in on saturday?").await.unwrap();
    let senders = texts(&bob, "#messages li.msg.theirs .sender").await.unwrap();
    assert_eq!(senders, [alice_name.as_str()]);
    // Read by everyone (Bob): Alice's tick turns blue live, and stays so after a reload, although
    // receipts are not replayed — the conversation list says how far every other member has got.
    tick_of(&alice, asked, "read").await.unwrap();
    reload(&alice, &url).await.unwrap();
    open_conversation_titled(&alice, "climbing").await.unwrap();
    tick_of(&alice, asked, "read").await.unwrap();

    // Alice, the owner, renames the group, removes Bob and adds him back, all from the UI; Bob's
    // browser follows each change. Bob, a member, has no such controls.
    let hidden = "return document.getElementById('group-manage').hidden;";
    assert_eq!(bob.eval(hidden, vec![]).await.unwrap(), json!(true), "only the owner manages");
    assert_eq!(alice.eval(hidden, vec![]).await.unwrap(), json!(false));
    alice.eval("document.getElementById('group-manage').open = true;", vec![]).await.unwrap();
    alice.type_into("#group-rename", "bouldering").await.unwrap();
    alice.click("#rename-group").await.unwrap();
    let titled = "return document.getElementById('thread-title').textContent === arguments[0];";
    alice.wait_for("the new name", titled, vec![json!("bouldering")]).await.unwrap();
    bob.wait_for("the new name at Bob's", titled, vec![json!("bouldering")]).await.unwrap();
    let bob_id = alice
        .eval(
            "return document.querySelector(`#people li[data-username=\"${arguments[0]}\"]`).dataset.userId;",
            vec![json!(bob_name)],
        )
        .await
        .unwrap();
    let bob_id = bob_id.as_str().unwrap().to_string();
    alice.click(&format!("#thread-members .member[data-user-id='{bob_id}'] .remove-member")).await.unwrap();
    let gone =
        "return ![...document.querySelectorAll('#conversations li .title')].some((e) => e.textContent === arguments[0])
                    && document.getElementById('thread-title').textContent === 'Pick a chat';";
    bob.wait_for("the group to leave Bob's list", gone, vec![json!("bouldering")]).await.unwrap();
    let member = "return document.querySelector(`#thread-members .member[data-user-id='${arguments[0]}']`) !== null;";
    assert_eq!(alice.eval(member, vec![json!(bob_id)]).await.unwrap(), json!(false), "Bob removed");
    tick_person(&alice, &bob_name).await.unwrap();
    alice.click("#add-members").await.unwrap();
    alice.wait_for("Bob back among the members", member, vec![json!(bob_id)]).await.unwrap();
    open_conversation_titled(&bob, "bouldering").await.unwrap();
    see_message(&bob, "who's in on saturday?").await.unwrap();

    // Bob leaves: the group disappears from his list, and Alice's member list loses him.
    bob.click("#leave-group").await.unwrap();
    bob.wait_for("the group to leave Bob's list", gone, vec![json!("bouldering")]).await.unwrap();
    alice
        .wait_for(
            "Bob gone from the members",
            "return !document.getElementById('thread-members').textContent.includes(arguments[0]);",
            vec![json!(bob_name)],
        )
        .await
        .unwrap();

    // Presence: Alice's People list shows Bob online while his browser is open (and the open
    // direct chat says the same); once it is closed, offline with the time he was last seen.
    let bob_online = "const li = document.querySelector(`#people li[data-username='${arguments[0]}']`);
         return li && li.dataset.online === arguments[1]
             && (arguments[1] === 'true' || li.querySelector('.presence-dot').title.startsWith('last seen'));";
    alice.wait_for("Bob online in People", bob_online, vec![json!(bob_name), json!("true")]).await.unwrap();
    open_chat_with(&alice, &bob_name).await.unwrap();
    alice
        .wait_for(
            "'online' in the chat header",
            "return document.getElementById('thread-presence').textContent === 'online';",
            vec![],
        )
        .await
        .unwrap();

    // Privacy: Bob shows last seen and online to his contacts only. Alice, not one, sees him
    // offline with no time at once; when Bob stars her in People she sees him online again. A
    // reload shows what the server stored.
    let choose = "const s = document.getElementById(arguments[0]); s.value = arguments[1];
                  s.dispatchEvent(new Event('change'));";
    let saved = "return document.getElementById('privacy-status').textContent === 'Saved';";
    bob.eval("document.getElementById('privacy-box').open = true;", vec![]).await.unwrap();
    let loaded = "return document.getElementById('privacy-form').dataset.loaded === 'true'
                    && document.getElementById('privacy-last-seen').value === arguments[0]
                    && document.getElementById('privacy-online').value === arguments[1]
                    && document.getElementById('privacy-groups').value === arguments[2]
                    && document.getElementById('privacy-read-receipts').checked === arguments[3];";
    let defaults = vec![json!("everyone"), json!("everyone"), json!("everyone"), json!(true)];
    bob.wait_for("the stored settings", loaded, defaults).await.unwrap();
    bob.eval(choose, vec![json!("privacy-last-seen"), json!("contacts")]).await.unwrap();
    bob.wait_for("last seen saved", saved, vec![]).await.unwrap();
    bob.eval(choose, vec![json!("privacy-online"), json!("same_as_last_seen")]).await.unwrap();
    bob.wait_for("online saved", saved, vec![]).await.unwrap();
    bob.eval(choose, vec![json!("privacy-groups"), json!("nobody")]).await.unwrap();
    bob.wait_for("groups saved", saved, vec![]).await.unwrap();
    bob.click("#privacy-read-receipts").await.unwrap();
    bob.wait_for("read receipts saved", saved, vec![]).await.unwrap();
    let hidden = "const li = document.querySelector(`#people li[data-username='${arguments[0]}']`);
                  return li && li.dataset.online === 'false' && li.querySelector('.presence-dot').title === 'offline'
                      && document.getElementById('thread-presence').textContent === 'offline';";
    alice.wait_for("Bob hidden from Alice", hidden, vec![json!(bob_name)]).await.unwrap();
    let star = format!("#people li[data-username=\"{alice_name}\"] .contact-toggle");
    bob.click(&star).await.unwrap();
    let starred = "const b = document.querySelector(`#people li[data-username='${arguments[0]}'] .contact-toggle`);
                   return b && b.dataset.contact === 'true' && b.textContent === '★';";
    bob.wait_for("Alice starred", starred, vec![json!(alice_name)]).await.unwrap();
    alice.wait_for("Bob online to his contact", bob_online, vec![json!(bob_name), json!("true")]).await.unwrap();
    reload(&bob, &url).await.unwrap();
    bob.wait_for("Alice still starred", starred, vec![json!(alice_name)]).await.unwrap();
    bob.eval("document.getElementById('privacy-box').open = true;", vec![]).await.unwrap();
    let stored = vec![json!("contacts"), json!("same_as_last_seen"), json!("nobody"), json!(false)];
    bob.wait_for("the settings after a reload", loaded, stored).await.unwrap();
    // Nobody may add Bob to a group now: Alice's attempt shows the server's refusal.
    tick_person(&alice, &bob_name).await.unwrap();
    alice.eval("document.getElementById('group-box').open = true;", vec![]).await.unwrap();
    alice.type_into("#group-name", "no bob").await.unwrap();
    alice.click("#create-group").await.unwrap();
    alice
        .wait_for(
            "the refusal",
            "return document.getElementById('group-error').textContent.includes('forbidden');",
            vec![],
        )
        .await
        .unwrap();
    tick_person(&alice, &bob_name).await.unwrap();

    // Bob leaves: Alice, his contact, sees when.
    alice.wait_for("Bob online after his reload", bob_online, vec![json!(bob_name), json!("true")]).await.unwrap();
    bob.close().await;
    alice.wait_for("Bob offline in People", bob_online, vec![json!(bob_name), json!("false")]).await.unwrap();
    alice
        .wait_for(
            "'last seen' in the chat header",
            "return document.getElementById('thread-presence').textContent.startsWith('last seen ');",
            vec![],
        )
        .await
        .unwrap();

    alice.close().await;
    drop(node);
}

/// Notifications in the browser: the 🔔 control, the service worker, and notifications built from
/// what the server really sent. Headless Chromium on a box without internet cannot reach its push
/// service (FCM), so the browser's own subscription cannot complete — the page must say so rather
/// than hang. The server's pushes therefore go to a test push service, for a device of the same
/// user subscribed over HTTP; the test decrypts each (as the browser would) and hands the payload
/// to the page's service worker through DevTools, and reads the notifications it shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_in_the_browser() {
    use parley_protocol::frames::{ClientFrame, ServerFrame};
    use parley_tests::push::{Device, PushService};
    let mut service = PushService::start().await;
    let dir = TempDir::new("parley-ui-store");
    let mut options = NodeOptions::new("n1", Storage::Embedded(dir.path().join("data")));
    options.extra_toml = service.toml();
    let node = NodeProcess::start(options).await.unwrap();
    let url = format!("http://{}/", node.http);
    let origin = format!("http://{}", node.http);
    let driver = Driver::start().await.unwrap();
    let bob = driver.browser("bob").await.unwrap();
    let bob_name = unique("bob");
    bob.goto(&url).await.unwrap();
    sign_up(&bob, &bob_name).await.unwrap();
    let notify = "const b = document.getElementById('notify'); return !b.hidden && b.dataset.state;";
    assert_eq!(bob.wait_for("the notifications control", notify, vec![]).await.unwrap(), json!("off"));

    // Allowed, but the browser's push service is out of reach: a clear failure, not a spinner.
    bob.cdp("Browser.grantPermissions", json!({"origin": origin, "permissions": ["notifications"]})).await.unwrap();
    bob.click("#notify").await.unwrap();
    let outcome = bob
        .wait_for(
            "the outcome of turning notifications on",
            "const b = document.getElementById('notify');
             return b.dataset.state !== 'busy' && [b.dataset.state, b.title, b.textContent];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(outcome[0], json!("failed"), "{outcome}");
    assert!(outcome[1].as_str().unwrap().contains("push service did not answer"), "{outcome}");
    let workers = bob
        .eval(
            "return navigator.serviceWorker.getRegistrations().then(rs => rs.map(r => [new URL(r.scope).pathname, !!r.active]));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(workers, json!([["/ui/", true]]), "the service worker is installed and active");

    // Bob's phone is subscribed; bob signs out of the browser and is offline everywhere.
    let client = node.client();
    let alice = client.register(&unique("alice"), PASSWORD).await.unwrap();
    let bob_phone = client.login(&bob_name, PASSWORD).await.unwrap();
    let phone = Device::new(&service, "/bob-phone");
    client.push_subscribe(&bob_phone.token, &phone.subscription()).await.unwrap();
    let mut a = client.connect(&alice.token, "phone").await.unwrap();
    a.send(&ClientFrame::Presence { user_ids: vec![bob_phone.user_id] }).await.unwrap();
    bob.click("#logout").await.unwrap();
    let offline = |f: &ServerFrame| matches!(f, ServerFrame::Presence { online: false, .. });
    a.expect(parley_tests::browser::UI_TIMEOUT, offline).await.unwrap();

    // What the server sends is what the service worker shows; a newer message of the same chat
    // replaces the notification rather than adding one.
    bob.cdp("ServiceWorker.enable", json!({})).await.unwrap();
    let shown = "return navigator.serviceWorker.getRegistration('/ui/')
                     .then(r => r.getNotifications())
                     .then(ns => JSON.stringify(ns.map(n => [n.title, n.body, n.tag])) === arguments[0]);";
    for (i, text) in ["dinner at 8?", "and bring <b>wine</b>"].into_iter().enumerate() {
        a.send_message(bob_phone.user_id, text, &format!("n{i}")).await.unwrap();
        let payload = String::from_utf8(phone.decrypt(&service.next().await)).unwrap();
        // The first registration of a fresh profile.
        bob.cdp("ServiceWorker.deliverPushMessage", json!({"origin": origin, "registrationId": "0", "data": payload}))
            .await
            .unwrap();
        let want = json!([[
            alice.username,
            text,
            parley_protocol::ConversationId::direct(alice.user_id, bob_phone.user_id).to_string()
        ]]);
        bob.wait_for("the notification", shown, vec![json!(want.to_string())]).await.unwrap();
    }

    // Bob signs in again and mutes the chat from its header: the server keeps it (his other
    // devices see it in their list), and a reload still shows it muted.
    submit_auth(&bob, &bob_name, PASSWORD, "#login").await.unwrap();
    open_conversation_titled(&bob, &alice.username).await.unwrap();
    let muted = "const b = document.getElementById('mute');
                 return !b.hidden && b.dataset.muted === arguments[0]
                     && (arguments[0] === 'false' || document.querySelector('#conversations li.active .muted-icon') !== null);";
    bob.wait_for("the chat unmuted", muted, vec![json!("false")]).await.unwrap();
    bob.click("#mute").await.unwrap();
    bob.wait_for("the chat muted", muted, vec![json!("true")]).await.unwrap();
    let listed = client.conversations(&bob_phone.token).await.unwrap();
    assert_eq!(listed[0].muted_until_ms, Some(parley_protocol::push::MUTED_FOREVER_MS));
    bob.goto(&url).await.unwrap();
    open_conversation_titled(&bob, &alice.username).await.unwrap();
    bob.wait_for("the chat still muted after a reload", muted, vec![json!("true")]).await.unwrap();
}
