//! The D-Bus edge: connect to the system bus, read the watched units'
//! current state (`ListUnits` + `Properties.GetAll`), add match rules for
//! unit `PropertiesChanged` and the manager's `JobRemoved`, call
//! `Manager.Subscribe` (without it systemd sends no unit signals), and turn
//! each signal into an [`Observation`] for the state machine in
//! [`crate::units`].

use std::collections::HashMap;
use std::num::NonZeroUsize;

use futures::StreamExt;
use futures::stream::{Select, select};
use zbus::message::Type as MessageType;
use zbus::wire::{OwnedObjectPath, OwnedVariant, Variant};
use zbus::{Connection, MatchRule, Message, MessageStream};

use crate::units::{Selection, Update, unit_from_path};

const SYSTEMD: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const UNIT: &str = "org.freedesktop.systemd1.Unit";
const SERVICE: &str = "org.freedesktop.systemd1.Service";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const UNIT_PATHS: &str = "/org/freedesktop/systemd1/unit";

/// Signals buffered per match rule before zbus drops the oldest.
const QUEUE: usize = 4096;

/// Something systemd said about a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub unit: String,
    pub update: Update,
}

/// A subscribed connection to systemd.
pub struct Watch {
    conn: Connection,
    signals: Select<MessageStream, MessageStream>,
}

/// `ListUnits` row: name, description, load, active, sub, following, path,
/// job id, job type, job path.
type UnitRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    OwnedObjectPath,
    u32,
    String,
    OwnedObjectPath,
);

/// Connect to the bus at `address` (`unix:path=/run/dbus/system_bus_socket`).
pub async fn connect(address: &str) -> zbus::Result<Connection> {
    zbus::connection::Builder::address(address).build().await
}

impl Watch {
    /// Connect, read the state of the units `selection` watches, then
    /// subscribe. Returns the watch and the current state of every watched
    /// loaded unit.
    pub async fn open(
        address: &str,
        selection: &Selection,
    ) -> zbus::Result<(Watch, Vec<Observation>)> {
        let conn = connect(address).await?;
        let snapshot = current_state(&conn, selection).await?;
        let queue = NonZeroUsize::new(QUEUE);
        let properties = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .interface(PROPERTIES)
            .member("PropertiesChanged")
            .path_namespace(UNIT_PATHS)
            .build()?;
        let jobs = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .interface(MANAGER)
            .member("JobRemoved")
            .path(MANAGER_PATH)
            .build()?;
        let properties = MessageStream::for_match_rule(properties, &conn, queue).await?;
        let jobs = MessageStream::for_match_rule(jobs, &conn, queue).await?;
        conn.call_method(Some(SYSTEMD), MANAGER_PATH, Some(MANAGER), "Subscribe", &())
            .await?;
        Ok((
            Watch {
                conn,
                signals: select(properties, jobs),
            },
            snapshot,
        ))
    }

    /// The next observation; `None` when the connection is gone.
    pub async fn next(&mut self) -> Option<Observation> {
        loop {
            let message = match self.signals.next().await? {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "unreadable D-Bus message");
                    continue;
                }
            };
            if let Some(observation) = observation(&message) {
                return Some(observation);
            }
        }
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// A signal as an observation, if it is one this module reads.
fn observation(message: &Message) -> Option<Observation> {
    let header = message.header();
    let member = header.member()?.as_str().to_string();
    let path = header.path()?.as_str().to_string();
    match member.as_str() {
        "PropertiesChanged" => {
            let (interface, changed, _invalidated): (
                String,
                HashMap<String, OwnedVariant>,
                Vec<String>,
            ) = message.body().deserialize().ok()?;
            if interface != UNIT && interface != SERVICE {
                return None;
            }
            let update = update_from(&changed);
            if update.is_empty() {
                return None;
            }
            Some(Observation {
                unit: unit_from_path(&path)?,
                update,
            })
        }
        "JobRemoved" => {
            let (_id, _job, unit, result): (u32, OwnedObjectPath, String, String) =
                message.body().deserialize().ok()?;
            Some(Observation {
                unit,
                update: Update {
                    job_result: Some(result),
                    ..Default::default()
                },
            })
        }
        _ => None,
    }
}

fn string(v: &Variant<'_>) -> Option<String> {
    match v {
        Variant::Str(s) => Some(s.as_str().to_string()),
        Variant::Variant(inner) => string(inner),
        _ => None,
    }
}

fn unsigned(v: &Variant<'_>) -> Option<u32> {
    match v {
        Variant::U32(n) => Some(*n),
        Variant::Variant(inner) => unsigned(inner),
        _ => None,
    }
}

fn signed(v: &Variant<'_>) -> Option<i32> {
    match v {
        Variant::I32(n) => Some(*n),
        Variant::Variant(inner) => signed(inner),
        _ => None,
    }
}

/// `ay` as lowercase hex (the unit's `InvocationID`).
fn hex_bytes(v: &Variant<'_>) -> Option<String> {
    match v {
        Variant::Array(a) => Some(
            a.inner()
                .iter()
                .filter_map(|b| match b {
                    Variant::U8(b) => Some(format!("{b:02x}")),
                    _ => None,
                })
                .collect(),
        ),
        Variant::Variant(inner) => hex_bytes(inner),
        _ => None,
    }
}

/// The properties this collector follows, from a property map.
pub fn update_from(props: &HashMap<String, OwnedVariant>) -> Update {
    let get = |k: &str| props.get(k).map(|v| &**v);
    Update {
        active_state: get("ActiveState").and_then(string),
        sub_state: get("SubState").and_then(string),
        result: get("Result").and_then(string),
        n_restarts: get("NRestarts").and_then(unsigned),
        exec_main_status: get("ExecMainStatus").and_then(signed),
        invocation_id: get("InvocationID").and_then(hex_bytes),
        job_result: None,
    }
}

async fn get_all(
    conn: &Connection,
    path: &OwnedObjectPath,
    interface: &str,
) -> zbus::Result<HashMap<String, OwnedVariant>> {
    let reply = conn
        .call_method(
            Some(SYSTEMD),
            path.as_str(),
            Some(PROPERTIES),
            "GetAll",
            &(interface,),
        )
        .await?;
    reply.body().deserialize()
}

/// The current state of every loaded unit `selection` watches.
pub async fn current_state(
    conn: &Connection,
    selection: &Selection,
) -> zbus::Result<Vec<Observation>> {
    let reply = conn
        .call_method(Some(SYSTEMD), MANAGER_PATH, Some(MANAGER), "ListUnits", &())
        .await?;
    let rows: Vec<UnitRow> = reply.body().deserialize()?;
    let mut out = Vec::new();
    for row in rows {
        let (name, path) = (row.0, row.6);
        if !selection.watches(&name) {
            continue;
        }
        let mut props = get_all(conn, &path, UNIT).await?;
        if name.ends_with(".service") {
            props.extend(get_all(conn, &path, SERVICE).await?);
        }
        out.push(Observation {
            unit: name,
            update: update_from(&props),
        });
    }
    Ok(out)
}

/// Ask systemd to start or stop a unit (tests drive the booted container with it).
pub async fn unit_job(conn: &Connection, method: &str, unit: &str) -> zbus::Result<()> {
    conn.call_method(
        Some(SYSTEMD),
        MANAGER_PATH,
        Some(MANAGER),
        method,
        &(unit, "replace"),
    )
    .await
    .map(|_| ())
}

/// systemd's `Manager.SystemState` (`running`, `degraded`, `starting`...).
pub async fn system_state(conn: &Connection) -> zbus::Result<String> {
    let reply = conn
        .call_method(
            Some(SYSTEMD),
            MANAGER_PATH,
            Some(PROPERTIES),
            "Get",
            &(MANAGER, "SystemState"),
        )
        .await?;
    let value: OwnedVariant = reply.body().deserialize()?;
    string(&value).ok_or_else(|| zbus::Error::Failure("SystemState is not a string".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(v: Variant<'static>) -> OwnedVariant {
        OwnedVariant::try_from(v).expect("owned variant")
    }

    #[test]
    fn reads_the_properties_systemd_sends() {
        let mut props = HashMap::new();
        props.insert("ActiveState".to_string(), owned(Variant::from("failed")));
        props.insert("SubState".to_string(), owned(Variant::from("failed")));
        props.insert("Result".to_string(), owned(Variant::from("exit-code")));
        props.insert("NRestarts".to_string(), owned(Variant::from(3u32)));
        props.insert("ExecMainStatus".to_string(), owned(Variant::from(3i32)));
        props.insert(
            "InvocationID".to_string(),
            owned(Variant::from(vec![0xabu8, 0x01])),
        );
        props.insert("Description".to_string(), owned(Variant::from("x")));
        let update = update_from(&props);
        assert_eq!(update.active_state.as_deref(), Some("failed"));
        assert_eq!(update.result.as_deref(), Some("exit-code"));
        assert_eq!(update.n_restarts, Some(3));
        assert_eq!(update.exec_main_status, Some(3));
        assert_eq!(update.invocation_id.as_deref(), Some("ab01"));
        // A property of the wrong type is ignored, not misread.
        let mut wrong = HashMap::new();
        wrong.insert("NRestarts".to_string(), owned(Variant::from("3")));
        assert!(update_from(&wrong).is_empty());
    }

    #[test]
    fn signals_become_observations() {
        let mut props = HashMap::new();
        props.insert("ActiveState".to_string(), owned(Variant::from("active")));
        let changed = Message::signal(
            "/org/freedesktop/systemd1/unit/crashy_2eservice",
            PROPERTIES,
            "PropertiesChanged",
        )
        .build(&(UNIT, props.clone(), Vec::<String>::new()))
        .expect("message");
        assert_eq!(
            observation(&changed),
            Some(Observation {
                unit: "crashy.service".into(),
                update: Update {
                    active_state: Some("active".into()),
                    ..Default::default()
                },
            })
        );
        // Other interfaces on a unit object are not read.
        let other = Message::signal(
            "/org/freedesktop/systemd1/unit/crashy_2eservice",
            PROPERTIES,
            "PropertiesChanged",
        )
        .build(&(
            "org.freedesktop.systemd1.Socket",
            props,
            Vec::<String>::new(),
        ))
        .expect("message");
        assert_eq!(observation(&other), None);
        let job = Message::signal(MANAGER_PATH, MANAGER, "JobRemoved")
            .build(&(
                7u32,
                OwnedObjectPath::try_from("/org/freedesktop/systemd1/job/7").expect("path"),
                "kubelet.service",
                "dependency",
            ))
            .expect("message");
        assert_eq!(
            observation(&job),
            Some(Observation {
                unit: "kubelet.service".into(),
                update: Update {
                    job_result: Some("dependency".into()),
                    ..Default::default()
                },
            })
        );
    }
}
