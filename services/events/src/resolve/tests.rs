use std::sync::Arc;

use ruma::RoomVersionId;
use ruma::events::StateEventType;
use serde_json::json;

use super::*;
use crate::room_setup::Preset;
use crate::room_state::RoomState;
use crate::room_state::tests::{create_room, fetch, index, setup};
use crate::test_support::{key, server, template};

/// The events in some forks' auth chains and not in all.
fn difference(chains: &[HashSet<OwnedEventId>]) -> HashSet<OwnedEventId> {
    let union: HashSet<OwnedEventId> = chains.iter().flatten().cloned().collect();
    union
        .into_iter()
        .filter(|id| !chains.iter().all(|chain| chain.contains(id)))
        .collect()
}

/// The cut-down auth chains have the full chains' auth difference (which
/// is returned).
fn assert_same_auth_difference(
    forks: &[StateIds],
    map: &std::collections::HashMap<OwnedEventId, Arc<Pdu>>,
) -> HashSet<OwnedEventId> {
    let full: Vec<HashSet<OwnedEventId>> = forks
        .iter()
        .map(|fork| auth_chain(fork.values().cloned(), fetch(map)))
        .collect();
    let cut = auth_chains_for_difference(forks, &conflicted_keys(forks), fetch(map));
    assert_eq!(difference(&cut), difference(&full));
    for (cut, full) in cut.iter().zip(&full) {
        assert!(
            cut.is_subset(full),
            "a cut-down chain is part of the full one"
        );
    }
    difference(&full)
}

#[test]
fn a_demotion_beats_a_concurrent_action_it_forbids() {
    for version in crate::room_version::supported() {
        // Alice creates a room; Bob joins and is given power 50 (enough to rename).
        let mut s = setup(version.clone(), Preset::PublicChat, &[]);
        s.public = true;
        s.name = None;
        let (mut room, mut events) = create_room(&s);
        let mut push = |room: &mut crate::room_state::RoomState, t| {
            let pdu = room.create_event(&t, key(), server()).unwrap();
            room.apply(pdu.clone());
            events.push(pdu.clone());
            pdu
        };
        push(
            &mut room,
            template(
                "bob",
                "m.room.member",
                Some("@bob:test.local"),
                json!({"membership": "join"}),
            ),
        );
        let mut pl = room
            .get(&StateEventType::RoomPowerLevels, "")
            .unwrap()
            .content_value();
        pl["users"]["@bob:test.local"] = json!(50);
        push(
            &mut room,
            template("alice", "m.room.power_levels", Some(""), pl.clone()),
        );

        // Fork: on one branch Alice demotes Bob; on the other Bob renames the room.
        let mut branch_a = room.clone();
        let mut branch_b = room.clone();
        pl["users"]["@bob:test.local"] = json!(0);
        let demote = push(
            &mut branch_a,
            template("alice", "m.room.power_levels", Some(""), pl),
        );
        let mut rename = template(
            "bob",
            "m.room.name",
            Some(""),
            json!({"name": "Bob's room"}),
        );
        rename.origin_server_ts += 10;
        let rename = push(&mut branch_b, rename);

        let map = index(&events);
        let forks = [branch_a.state_map(), branch_b.state_map()];
        let bob_join = room
            .get(&StateEventType::RoomMember, "@bob:test.local")
            .unwrap()
            .event_id()
            .to_owned();
        assert!(
            assert_same_auth_difference(&forks, &map).contains(&bob_join),
            "{version}: Bob's join is in the rename's auth chain only"
        );
        let resolved = resolve(room.rules(), &forks, fetch(&map)).unwrap();
        let pl_key = (StateEventType::RoomPowerLevels, String::new());
        assert_eq!(
            resolved[&pl_key],
            demote.event_id(),
            "{version}: the demotion stands"
        );
        let name_key = (StateEventType::RoomName, String::new());
        assert!(
            !resolved.contains_key(&name_key),
            "{version}: the rename by a demoted user is dropped, got {:?} (rename {})",
            resolved.get(&name_key),
            rename.event_id()
        );
    }
}

#[test]
fn non_conflicting_forks_merge() {
    let mut s = setup(RoomVersionId::V12, Preset::PrivateChat, &[]);
    s.topic = None;
    let (room, mut events) = create_room(&s);
    let mut a = room.clone();
    let mut b = room.clone();
    let topic = a
        .create_event(
            &template("alice", "m.room.topic", Some(""), json!({"topic": "t"})),
            key(),
            server(),
        )
        .unwrap();
    a.apply(topic.clone());
    let avatar = b
        .create_event(
            &template(
                "alice",
                "m.room.avatar",
                Some(""),
                json!({"url": "mxc://x/y"}),
            ),
            key(),
            server(),
        )
        .unwrap();
    b.apply(avatar.clone());
    events.extend([topic.clone(), avatar.clone()]);
    let map = index(&events);
    let forks = [a.state_map(), b.state_map(), room.state_map()];
    assert_same_auth_difference(&forks, &map);
    let resolved = resolve(room.rules(), &forks[..2], fetch(&map)).unwrap();
    assert_eq!(
        resolved[&(StateEventType::RoomTopic, String::new())],
        topic.event_id()
    );
    assert_eq!(
        resolved[&(StateEventType::RoomAvatar, String::new())],
        avatar.event_id()
    );
}

#[test]
fn conflicted_subgraph_is_the_paths_between_conflicted_events() {
    let (_, events) = create_room(&setup(RoomVersionId::V11, Preset::PrivateChat, &[]));
    let map: std::collections::HashMap<_, Arc<Pdu>> = index(&events);
    // events[0] create, [1] alice join, [2] power levels: PL's auth chain reaches the join and create.
    let pl = events[2].event_id().to_owned();
    let create = events[0].event_id().to_owned();
    let join = events[1].event_id().to_owned();
    let subgraph = conflicted_state_subgraph(&[pl.clone(), create.clone()], fetch(&map));
    assert!(subgraph.contains(&pl) && subgraph.contains(&create));
    assert!(
        subgraph.contains(&join),
        "join lies on the path from power levels to create"
    );
    // With only the join and create conflicted, power levels is not between them.
    let subgraph = conflicted_state_subgraph(&[join.clone(), create.clone()], fetch(&map));
    assert!(!subgraph.contains(&pl));
    let chain = auth_chain([pl], fetch(&map));
    assert!(chain.contains(&create) && chain.contains(&join));
}

/// A small deterministic generator (xorshift), so failures can be replayed
/// by seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

const PEOPLE: [&str; 6] = ["bob", "carol", "dan", "erin", "frank", "grace"];

/// One pseudo-random step on a fork: a join, leave, kick, ban, power level
/// change, topic, name or join rule change, by a random sender. Kept only
/// when the fork's own state allows it (the forks are valid histories that
/// resolution must reconcile).
fn random_step(room: &mut RoomState, events: &mut Vec<Arc<Pdu>>, rng: &mut Rng, ts: u64) {
    let who = PEOPLE[rng.below(PEOPLE.len())];
    let target = format!("@{}:test.local", PEOPLE[rng.below(PEOPLE.len())]);
    let admin = ["alice", "bob", "carol"][rng.below(3)];
    let mut t = match rng.below(8) {
        0 | 1 => template(
            who,
            "m.room.member",
            Some(&format!("@{who}:test.local")),
            json!({"membership": "join"}),
        ),
        2 => template(
            who,
            "m.room.member",
            Some(&format!("@{who}:test.local")),
            json!({"membership": "leave"}),
        ),
        3 => template(
            admin,
            "m.room.member",
            Some(&target),
            json!({"membership": (["leave", "ban"][rng.below(2)])}),
        ),
        4 => {
            let mut pl = room
                .get(&StateEventType::RoomPowerLevels, "")
                .unwrap()
                .content_value();
            pl["users"][&target] = json!([0, 50, 100][rng.below(3)]);
            template(admin, "m.room.power_levels", Some(""), pl)
        }
        5 => template(
            who,
            "m.room.topic",
            Some(""),
            json!({"topic": format!("{ts}")}),
        ),
        6 => template(
            admin,
            "m.room.join_rules",
            Some(""),
            json!({"join_rule": (["public", "invite"][rng.below(2)])}),
        ),
        _ => template(
            who,
            "m.room.name",
            Some(""),
            json!({"name": format!("{ts}")}),
        ),
    };
    t.origin_server_ts += ts;
    if let Ok(pdu) = room.create_event(&t, key(), server()) {
        room.apply(pdu.clone());
        events.push(pdu);
    }
}

/// ruma's resolution of the whole forks with their whole auth chains: what
/// `resolve` must equal.
fn unreduced(
    rules: &RoomVersionRules,
    forks: &[StateIds],
    map: &std::collections::HashMap<OwnedEventId, Arc<Pdu>>,
) -> StateIds {
    let StateResolutionVersion::V2(state_res_rules) = &rules.state_res else {
        panic!("v2 only");
    };
    let ruma_forks: Vec<StateMap> = forks
        .iter()
        .map(|fork| fork.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .collect();
    let chains = forks
        .iter()
        .map(|fork| {
            auth_chain(fork.values().cloned(), fetch(map))
                .into_iter()
                .collect()
        })
        .collect();
    ruma::state_res::resolve(
        &rules.authorization,
        state_res_rules,
        ruma_forks.iter(),
        chains,
        fetch(map),
        |conflicted| {
            let seeds: Vec<OwnedEventId> = conflicted.values().flatten().cloned().collect();
            Some(
                conflicted_state_subgraph(&seeds, fetch(map))
                    .into_iter()
                    .collect(),
            )
        },
    )
    .unwrap()
    .into_iter()
    .collect()
}

#[test]
fn reduced_resolution_equals_ruma_on_the_whole_forks() {
    let mut merged = 0;
    let mut dropped = 0;
    let mut unconflicted_difference = 0;
    for version in crate::room_version::supported() {
        for seed in 1..=60u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut s = setup(version.clone(), Preset::PublicChat, &[]);
            s.public = true;
            let (mut room, mut events) = create_room(&s);
            for (who, level) in [("bob", 100), ("carol", 50)] {
                let join = template(
                    who,
                    "m.room.member",
                    Some(&format!("@{who}:test.local")),
                    json!({"membership": "join"}),
                );
                let pdu = room.create_event(&join, key(), server()).unwrap();
                room.apply(pdu.clone());
                events.push(pdu);
                let mut pl = room
                    .get(&StateEventType::RoomPowerLevels, "")
                    .unwrap()
                    .content_value();
                pl["users"][format!("@{who}:test.local")] = json!(level);
                let pdu = room
                    .create_event(
                        &template("alice", "m.room.power_levels", Some(""), pl),
                        key(),
                        server(),
                    )
                    .unwrap();
                room.apply(pdu.clone());
                events.push(pdu);
            }
            // Forks grow from the room or from a point of an earlier fork.
            let mut points = vec![room];
            let mut forks = Vec::new();
            let mut ts = 0;
            for _ in 0..2 + rng.below(3) {
                let mut fork = points[rng.below(points.len())].clone();
                for _ in 0..rng.below(7) {
                    ts += 1;
                    random_step(&mut fork, &mut events, &mut rng, ts);
                    points.push(fork.clone());
                }
                forks.push(fork);
            }
            let forks: Vec<StateIds> = forks.iter().map(RoomState::state_map).collect();
            let map = index(&events);
            let rules = crate::room_version::rules(&version).unwrap();
            let expected = unreduced(&rules, &forks, &map);
            let got = resolve(&rules, &forks, fetch(&map)).unwrap();
            assert_eq!(got, expected, "{version} seed {seed}");

            let conflicted = conflicted_keys(&forks);
            merged += usize::from(forks.iter().all(|fork| *fork != got));
            dropped += usize::from(conflicted.iter().any(|key| !got.contains_key(key)));
            let chains: Vec<HashSet<OwnedEventId>> = forks
                .iter()
                .map(|fork| {
                    auth_chain(
                        conflicted.iter().filter_map(|key| fork.get(key).cloned()),
                        fetch(&map),
                    )
                })
                .collect();
            unconflicted_difference +=
                usize::from(difference(&chains) != assert_same_auth_difference(&forks, &map));
        }
    }
    // The generated cases reach what the reduction must get right: results
    // that are no single fork, conflicted events that lose, and auth
    // differences the unconflicted state's chain cuts down.
    assert!(merged > 50, "{merged} merges");
    assert!(
        dropped > 5,
        "{dropped} where every fork's event at a slot lost"
    );
    assert!(
        unconflicted_difference > 20,
        "{unconflicted_difference} where the unconflicted chain mattered"
    );
}
