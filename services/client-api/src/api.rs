//! HTTP routes of the client-server API (everything but `/sync`), and the
//! Synapse-compatible admin endpoints operators script against.

mod account_data;
mod admin;
mod aliases;
mod create_room;
mod membership;
mod misc;
mod profile;
mod read;
mod register;
mod send;
mod session;

use axum::Router;
use axum::routing::{MethodRouter, get, post, put};
use tessera_matrix_http::layers;

use crate::state::AppState;

/// Mount a client API path under both `/v3` and the legacy `/r0`.
fn client(
    router: Router<AppState>,
    path: &str,
    method: MethodRouter<AppState>,
) -> Router<AppState> {
    router
        .route(&format!("/_matrix/client/v3{path}"), method.clone())
        .route(&format!("/_matrix/client/r0{path}"), method)
}

pub fn router(state: AppState, admin: Option<Router>) -> Router {
    let mut r: Router<AppState> = Router::new()
        .route("/_matrix/client/versions", get(misc::versions))
        .route("/.well-known/matrix/client", get(misc::well_known))
        .route("/.well-known/matrix/server", get(misc::well_known_server))
        .route(
            "/_matrix/client/v1/register/m.login.registration_token/validity",
            get(register::token_validity),
        )
        .route(
            "/_synapse/admin/v1/register",
            get(register::admin_nonce).post(register::admin_register),
        )
        .route(
            "/_synapse/admin/v1/registration_tokens",
            get(register::list_tokens),
        )
        .route(
            "/_synapse/admin/v1/registration_tokens/new",
            post(register::new_token),
        )
        .route(
            "/_synapse/admin/v1/registration_tokens/{token}",
            axum::routing::delete(register::delete_token),
        )
        .route("/_synapse/admin/v2/users", get(admin::list_users))
        .route(
            "/_synapse/admin/v1/deactivate/{user_id}",
            post(admin::deactivate),
        );
    let routes: Vec<(&str, MethodRouter<AppState>)> = vec![
        ("/login", get(session::login_flows).post(session::login)),
        ("/logout", post(session::logout)),
        ("/logout/all", post(session::logout_all)),
        ("/account/whoami", get(session::whoami)),
        ("/devices", get(session::devices)),
        ("/register", post(register::register)),
        ("/register/available", get(register::available)),
        ("/capabilities", get(misc::capabilities)),
        ("/pushrules/", get(misc::push_rules)),
        ("/pushrules/global/", get(misc::push_rules_global)),
        ("/createRoom", post(create_room::create_room)),
        ("/join/{room}", post(membership::join_by_id_or_alias)),
        ("/knock/{room}", post(membership::knock)),
        ("/rooms/{room}/join", post(membership::join_by_id)),
        ("/rooms/{room}/leave", post(membership::leave)),
        ("/rooms/{room}/invite", post(membership::invite)),
        ("/rooms/{room}/kick", post(membership::kick)),
        ("/rooms/{room}/ban", post(membership::ban)),
        ("/rooms/{room}/unban", post(membership::unban)),
        ("/rooms/{room}/send/{kind}/{txn}", put(send::send_message)),
        (
            "/rooms/{room}/state/{kind}",
            put(send::put_state_empty_key).get(read::state_event_empty_key),
        ),
        // An empty state key as clients spell it too (matrix-js-sdk does).
        (
            "/rooms/{room}/state/{kind}/",
            put(send::put_state_empty_key).get(read::state_event_empty_key),
        ),
        (
            "/rooms/{room}/state/{kind}/{key}",
            put(send::put_state).get(read::state_event),
        ),
        ("/rooms/{room}/state", get(read::room_state)),
        ("/rooms/{room}/redact/{event}/{txn}", put(send::redact)),
        ("/rooms/{room}/event/{event}", get(read::event)),
        ("/rooms/{room}/messages", get(read::messages)),
        ("/rooms/{room}/context/{event}", get(read::context)),
        ("/rooms/{room}/members", get(read::members)),
        ("/rooms/{room}/joined_members", get(read::joined_members)),
        ("/rooms/{room}/aliases", get(aliases::room_aliases)),
        (
            "/rooms/{room}/read_markers",
            post(account_data::read_markers),
        ),
        ("/joined_rooms", get(read::joined_rooms)),
        (
            "/directory/room/{alias}",
            get(aliases::get_alias)
                .put(aliases::put_alias)
                .delete(aliases::delete_alias),
        ),
        (
            "/directory/list/room/{room}",
            get(aliases::get_visibility).put(aliases::put_visibility),
        ),
        ("/publicRooms", get(aliases::public_rooms)),
        ("/profile/{user}", get(profile::profile)),
        (
            "/profile/{user}/displayname",
            get(profile::get_displayname).put(profile::set_displayname),
        ),
        (
            "/profile/{user}/avatar_url",
            get(profile::get_avatar_url).put(profile::set_avatar_url),
        ),
        ("/user/{user}/filter", post(account_data::create_filter)),
        (
            "/user/{user}/filter/{filter}",
            get(account_data::get_filter),
        ),
        (
            "/user/{user}/account_data/{kind}",
            get(account_data::get_global).put(account_data::put_global),
        ),
        (
            "/user/{user}/rooms/{room}/account_data/{kind}",
            get(account_data::get_room).put(account_data::put_room),
        ),
    ];
    for (path, method) in routes {
        r = client(r, path, method);
    }
    r.fallback(layers::unrecognized)
        .method_not_allowed_fallback(layers::method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn(layers::metrics))
        .layer(axum::middleware::from_fn(layers::cors))
        .merge(admin.unwrap_or_default())
}
