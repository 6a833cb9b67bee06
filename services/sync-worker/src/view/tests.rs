//! Busy rooms and urgent wake-ups in the view (one partition throughout).

use std::sync::Arc;

use tessera_replication::{EventEntry, ReplicationSink};

use super::{View, Waiter, user_key};

fn entry(pos: i64, room_id: &str) -> EventEntry {
    EventEntry {
        pos,
        room_id: room_id.to_owned(),
        event_id: format!("$e{pos}"),
        kind: "m.room.message".to_owned(),
        state_key: None,
        membership: None,
        rejected: false,
    }
}

/// Applies `count` events to `room` after position `*pos`.
fn events(view: &View, pos: &mut i64, room: &str, count: usize) {
    let entries: Vec<EventEntry> = (0..count)
        .map(|_| {
            *pos += 1;
            entry(*pos, room)
        })
        .collect();
    view.apply(0, &entries);
}

fn keys(rooms: &[&str]) -> Vec<String> {
    rooms.iter().map(|r| (*r).to_owned()).collect()
}

fn woken(waiter: &Arc<Waiter>) -> bool {
    futures::FutureExt::now_or_never(waiter.notified()).is_some()
}

#[test]
fn a_room_past_the_rate_is_busy_and_its_wake_ups_are_not_urgent() {
    let view = View::new(vec![0], 5);
    let mut pos = 0;
    events(&view, &mut pos, "!busy:x", 5);
    assert!(view.only_busy_rooms_moved(&keys(&["!busy:x", "!quiet:x"]), &[0], 1));

    let waiter = view.register(&keys(&["!busy:x", "!quiet:x"]));
    events(&view, &mut pos, "!busy:x", 1);
    assert!(woken(&waiter));
    assert!(
        !waiter.is_urgent(),
        "a busy room's event alone is not urgent"
    );

    // The busy room's key was used up by that wake-up; the quiet room's is
    // still registered.
    events(&view, &mut pos, "!quiet:x", 1);
    assert!(woken(&waiter));
    assert!(waiter.is_urgent(), "a quiet room's event is urgent");
    assert!(!view.only_busy_rooms_moved(&keys(&["!busy:x", "!quiet:x"]), &[0], 1));
}

#[test]
fn a_room_below_the_rate_wakes_urgently() {
    let view = View::new(vec![0], 5);
    let mut pos = 0;
    events(&view, &mut pos, "!room:x", 3);
    assert!(!view.only_busy_rooms_moved(&keys(&["!room:x"]), &[0], 1));
    let waiter = view.register(&keys(&["!room:x"]));
    events(&view, &mut pos, "!room:x", 1);
    assert!(woken(&waiter));
    assert!(waiter.is_urgent(), "four events in a second are below five");
    // The fifth makes it busy.
    let waiter = view.register(&keys(&["!room:x"]));
    events(&view, &mut pos, "!room:x", 1);
    assert!(woken(&waiter));
    assert!(!waiter.is_urgent());
}

#[test]
fn only_busy_rooms_moved_needs_a_busy_room_with_news_and_nothing_else() {
    let view = View::new(vec![10], 3);
    let mut pos = 10;
    events(&view, &mut pos, "!busy:x", 3);
    let all = keys(&["!busy:x", "!other:x"]);
    assert!(view.only_busy_rooms_moved(&all, &[10], 1));
    // Nothing after the token: no news at all.
    assert!(!view.only_busy_rooms_moved(&all, &[pos], 1));
    // A token from before this worker started: heads are not all known.
    assert!(!view.only_busy_rooms_moved(&all, &[5], 1));
    // A token of the wrong shape is not trusted either.
    assert!(!view.only_busy_rooms_moved(&all, &[], 1));
    // With the rate at 0, no room is busy.
    let off = View::new(vec![0], 0);
    let mut pos = 0;
    events(&off, &mut pos, "!busy:x", 50);
    assert!(!off.only_busy_rooms_moved(&keys(&["!busy:x"]), &[0], 1));
}

#[test]
fn the_users_own_news_is_urgent_even_in_a_busy_room() {
    let view = View::new(vec![0], 2);
    let mut pos = 0;
    events(&view, &mut pos, "!busy:x", 2);
    let waiter = view.register(&[user_key("@a:x")]);
    pos += 1;
    view.apply(
        0,
        &[EventEntry {
            kind: "m.room.member".to_owned(),
            state_key: Some("@a:x".to_owned()),
            membership: Some("invite".to_owned()),
            ..entry(pos, "!busy:x")
        }],
    );
    assert!(woken(&waiter));
    assert!(waiter.is_urgent());

    let waiter = view.register(&[user_key("@b:x")]);
    view.user_changed("@b:x");
    assert!(woken(&waiter));
    assert!(waiter.is_urgent());
}
