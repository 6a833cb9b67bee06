//! Supported room versions.
//!
//! We create rooms in version 12 by default, the specification's current default
//! (ruma 0.17 implements its rules: room IDs derived from the create event,
//! privileged creators and state resolution v2.1). Versions 10 and 11 are also
//! stable here; older versions need rules ruma supports only on a best-effort
//! basis, so we neither advertise nor accept them.

use ruma::RoomVersionId;
use ruma::room_version_rules::RoomVersionRules;

/// The version `createRoom` uses when the client does not ask for one.
pub const DEFAULT_ROOM_VERSION: RoomVersionId = RoomVersionId::V12;

/// Versions we can create and join.
pub fn supported() -> [RoomVersionId; 3] {
    [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12]
}

pub fn is_supported(version: &RoomVersionId) -> bool {
    supported().contains(version)
}

/// The ruma rules of a supported room version.
pub fn rules(version: &RoomVersionId) -> Option<RoomVersionRules> {
    if is_supported(version) {
        version.rules()
    } else {
        None
    }
}
