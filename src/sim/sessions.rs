//! The simulator's catalogue: the seed sessions (the Graph docs' example and a town
//! hall) and generated ones, dated relative to when the simulator started.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use super::*;

pub(super) fn seed_session(id: &str, subject: &str) -> serde_json::Value {
    json!({
        "@odata.type": "#microsoft.graph.virtualEventSession",
        "id": id,
        "joinWebUrl": "https://teams.microsoft.com/l/meetup-join/19%3ameeting_ZDVjNzk3OWEtYjc2NS00NTA1LTkyMzQtYTYzMGI5YmFmMjM5%40thread.v2/0?context=%7b%22Tid%22%3a%2272f988bf-86f1-41af-91ab-2d7cd011db47%22%2c%22Oid%22%3a%221cd068e4-5b08-4e75-a7f9-7b4e067a0820%22%7d",
        "subject": subject,
        "participants": {"@odata.type": "microsoft.graph.meetingParticipants"},
        "isBroadcast": null,
        "broadcastSettings": null,
        "capabilities": [],
        "audioConferencing": null,
        "chatInfo": {
            "threadId": "19:meeting_ZDVjNzk3OWEtYjc2NS00NTA1LTkyMzQtYTYzMGI5YmFmMjM5@thread.v2",
            "messageId": "0",
            "replyChainMessageId": null
        },
        "videoTeleconferenceId": null,
        "externalId": null,
        "joinMeetingIdSettings": null,
        "lobbyBypassSettings": null,
        "isEntryExitAnnounced": null,
        "allowedPresenters": null,
        "allowAttendeeToEnableMic": null,
        "allowAttendeeToEnableCamera": null,
        "allowMeetingChat": null,
        "shareMeetingChatHistoryDefault": null,
        "allowTeamworkReactions": null,
        "recordAutomatically": null,
        "watermarkProtection": null,
        "allowParticipantsToChangeName": null
    })
}

/// The simulator's "now" for dates: `now` to the whole minute.
pub(super) fn reference_time(now: std::time::SystemTime) -> std::time::SystemTime {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::time::UNIX_EPOCH + Duration::from_secs(secs - secs % 60)
}

/// Start and end relative to `epoch`, by the session id, so that every kind of session a
/// caller meets exists whenever the simulator runs: `gen-ended-*` ended two days ago
/// (`smart_ttl` keeps it for `ttl_ended`), `gen-live-*` and the town hall seed are under
/// way (started 30 minutes ago, end in an hour), everything else (the webinar seed
/// included) is upcoming: in a week, for 90 minutes.
pub(super) fn set_dates(
    object: &mut serde_json::Value,
    session: &str,
    epoch: std::time::SystemTime,
) {
    const MINUTE: u64 = 60;
    const DAY: u64 = 24 * 60 * MINUTE;
    let (start, end) = if session.starts_with("gen-ended") {
        (
            epoch - Duration::from_secs(2 * DAY),
            epoch - Duration::from_secs(2 * DAY - 60 * MINUTE),
        )
    } else if session.starts_with("gen-live") || session == TOWNHALL_SESSION {
        (
            epoch - Duration::from_secs(30 * MINUTE),
            epoch + Duration::from_secs(60 * MINUTE),
        )
    } else {
        (
            epoch + Duration::from_secs(7 * DAY),
            epoch + Duration::from_secs(7 * DAY + 90 * MINUTE),
        )
    };
    if let Some(map) = object.as_object_mut() {
        for (field, at) in [("startDateTime", start), ("endDateTime", end)] {
            map.insert(
                field.to_string(),
                json!(humantime::format_rfc3339_seconds(at).to_string()),
            );
        }
    }
}

impl Simulator {
    /// What the simulator answers for a `gen-` session it has not been given.
    pub fn generated_body(&self, kind: &str, event: &str, session: &str) -> Bytes {
        generated_body_at(kind, event, session, self.state.epoch)
    }
}

/// A bare session object with `@odata.context`, as Graph most likely really answers,
/// dated relative to `epoch` (see [`set_dates`]).
pub(super) fn generated_body_at(
    kind: &str,
    event: &str,
    session: &str,
    epoch: std::time::SystemTime,
) -> Bytes {
    let mut object = seed_session(session, &format!("Generated session {session} of {event}"));
    set_dates(&mut object, session, epoch);
    if let Some(map) = object.as_object_mut() {
        map.insert(
            "@odata.context".to_string(),
            json!(format!("https://graph.microsoft.com/v1.0/$metadata#solutions/virtualEvents/{kind}('{event}')/sessions/$entity")),
        );
    }
    Bytes::from(object.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn dates(body: &[u8]) -> (SystemTime, SystemTime) {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        let v = v.get("value").unwrap_or(&v);
        let at = |field: &str| humantime::parse_rfc3339(v[field].as_str().unwrap()).unwrap();
        (at("startDateTime"), at("endDateTime"))
    }

    #[test]
    fn sessions_are_upcoming_live_or_ended_relative_to_now() {
        let sim = Simulator::new(SimConfig::default(), Clock::new());
        let now = SystemTime::now();
        let seed = lock(&sim.state.sessions)
            .get(&(
                "webinars".to_string(),
                SEED_EVENT.to_string(),
                SEED_SESSION.to_string(),
            ))
            .cloned()
            .unwrap();
        for (body, what) in [
            (seed, "seed"),
            (sim.generated_body("webinars", "e", "gen-x"), "generated"),
        ] {
            let (start, end) = dates(&body);
            assert!(start > now + Duration::from_secs(6 * 24 * 3600), "{what}");
            assert!(end > start, "{what}");
        }
        for session in ["gen-live-1", TOWNHALL_SESSION] {
            let (start, end) = dates(&sim.generated_body("townhalls", "e", session));
            assert!(start < now && now < end, "{session} is under way");
        }
        let (_, end) = dates(&sim.generated_body("webinars", "e", "gen-ended-1"));
        assert!(
            end + Duration::from_secs(24 * 3600) < now,
            "ended a day ago or more"
        );
        // The same session gets the same bytes every time (tests compare bodies).
        assert_eq!(
            sim.generated_body("webinars", "e", "gen-x"),
            sim.generated_body("webinars", "e", "gen-x")
        );
    }
}
