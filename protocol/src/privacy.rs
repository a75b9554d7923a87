//! Presence privacy (PROTOCOL.md §5, "Privacy and contacts"): who may see that a user is online
//! and when they were last seen, and the contact list that "contacts" refers to.
//!
//! The settings follow WhatsApp's: last seen for everyone, for one's contacts, or for nobody;
//! "online" either for everyone or for the same people as last seen; who may add one to groups
//! (everyone, one's contacts, nobody); and read receipts, which in a direct chat go both ways or
//! neither (a user who sends none sees none). A contact is someone the
//! user added to *their own* list (`PUT /v1/me/contacts/:id`): being messaged by a stranger makes
//! nobody a contact. A watcher who may not see something is told nothing about it — a hidden user
//! looks exactly like one who is offline and was never seen, so hiding cannot be detected either.

use serde::{Deserialize, Serialize};

use crate::http::UserView;

/// Who may do something concerning a user: see when they were last seen, add them to a group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    #[default]
    Everyone,
    /// Only users on this user's contact list.
    Contacts,
    Nobody,
}

/// Who may see that a user is online now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnlineAudience {
    #[default]
    Everyone,
    /// Whoever may see last seen (WhatsApp's "same as last seen").
    SameAsLastSeen,
}

/// `GET`/`PUT /v1/me/privacy`. A new account's are the defaults: everyone sees everything, anyone
/// may add them to a group, read receipts on. A `PUT` names every field (nothing is reset by
/// omission).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PrivacySettings {
    /// Who may see when the user was last seen.
    pub last_seen: Audience,
    pub online: OnlineAudience,
    /// Who may add the user to a group (creating one with them, or adding them to one).
    pub groups: Audience,
    /// Whether the user's direct-chat partners learn how far they have read (and, the same
    /// either way, whether the user learns how far those partners have read). Groups always
    /// share read receipts, as in WhatsApp.
    pub read_receipts: bool,
}

impl Default for PrivacySettings {
    fn default() -> Self {
        PrivacySettings {
            last_seen: Audience::Everyone,
            online: OnlineAudience::Everyone,
            groups: Audience::Everyone,
            read_receipts: true,
        }
    }
}

/// What one watcher may see of a user under [`PrivacySettings`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shown {
    pub online: bool,
    pub last_seen: bool,
}

impl PrivacySettings {
    /// What a watcher sees; `is_contact`: the watcher is on the user's contact list. Whoever may
    /// see last seen may also see online (no setting shows last seen while hiding online, which
    /// would freeze a visible "last seen" while the user chats).
    pub fn shown_to(self, is_contact: bool) -> Shown {
        let last_seen = match self.last_seen {
            Audience::Everyone => true,
            Audience::Contacts => is_contact,
            Audience::Nobody => false,
        };
        let online = match self.online {
            OnlineAudience::Everyone => true,
            OnlineAudience::SameAsLastSeen => last_seen,
        };
        Shown { online, last_seen }
    }

    /// Whether someone may add the user to a group; `is_contact`: they are on the user's list.
    pub fn lets_add_to_groups(self, is_contact: bool) -> bool {
        match self.groups {
            Audience::Everyone => true,
            Audience::Contacts => is_contact,
            Audience::Nobody => false,
        }
    }
}

/// `GET /v1/me/contacts`: the caller's contacts, by username.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactsResponse {
    pub contacts: Vec<UserView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_is_never_hidden_from_someone_who_sees_last_seen() {
        for last_seen in [Audience::Everyone, Audience::Contacts, Audience::Nobody] {
            for online in [OnlineAudience::Everyone, OnlineAudience::SameAsLastSeen] {
                for contact in [false, true] {
                    let shown = PrivacySettings { last_seen, online, ..PrivacySettings::default() }.shown_to(contact);
                    assert!(shown.online || !shown.last_seen, "{last_seen:?} {online:?} {contact}");
                }
            }
        }
    }

    #[test]
    fn each_setting_shows_what_it_says() {
        let s = |last_seen, online| PrivacySettings { last_seen, online, ..PrivacySettings::default() };
        use Audience as L;
        use OnlineAudience as O;
        assert_eq!(s(L::Everyone, O::Everyone).shown_to(false), Shown { online: true, last_seen: true });
        assert_eq!(s(L::Contacts, O::Everyone).shown_to(false), Shown { online: true, last_seen: false });
        assert_eq!(s(L::Contacts, O::Everyone).shown_to(true), Shown { online: true, last_seen: true });
        assert_eq!(s(L::Contacts, O::SameAsLastSeen).shown_to(false), Shown { online: false, last_seen: false });
        assert_eq!(s(L::Contacts, O::SameAsLastSeen).shown_to(true), Shown { online: true, last_seen: true });
        assert_eq!(s(L::Nobody, O::Everyone).shown_to(true), Shown { online: true, last_seen: false });
        assert_eq!(s(L::Nobody, O::SameAsLastSeen).shown_to(true), Shown { online: false, last_seen: false });
    }

    #[test]
    fn settings_are_snake_case_json_and_every_field_is_required() {
        let json = r#"{"last_seen":"contacts","online":"same_as_last_seen","groups":"nobody","read_receipts":false}"#;
        let s: PrivacySettings = serde_json::from_str(json).unwrap();
        let want = PrivacySettings {
            last_seen: Audience::Contacts,
            online: OnlineAudience::SameAsLastSeen,
            groups: Audience::Nobody,
            read_receipts: false,
        };
        assert_eq!(s, want);
        assert_eq!(serde_json::to_string(&s).unwrap(), json);
        let bad = r#"{"last_seen":"friends","online":"everyone","groups":"everyone","read_receipts":true}"#;
        assert!(serde_json::from_str::<PrivacySettings>(bad).is_err());
        let partial = r#"{"last_seen":"nobody","online":"everyone","groups":"everyone"}"#;
        assert!(serde_json::from_str::<PrivacySettings>(partial).is_err(), "nothing is reset by omission");
        assert!(PrivacySettings::default().read_receipts, "on for a new account");
    }

    #[test]
    fn group_adds_follow_their_audience() {
        let s = |groups| PrivacySettings { groups, ..PrivacySettings::default() };
        assert!(s(Audience::Everyone).lets_add_to_groups(false));
        assert!(!s(Audience::Contacts).lets_add_to_groups(false));
        assert!(s(Audience::Contacts).lets_add_to_groups(true));
        assert!(!s(Audience::Nobody).lets_add_to_groups(true));
    }
}
