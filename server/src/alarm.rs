//! Alarms (etcd's alarmStore): NOSPACE when a member's backend crosses the
//! quota, CORRUPT when members' hashes disagree. Raised and cleared through
//! Raft, so every member agrees on them; while one is active, the apply
//! loop refuses what etcd refuses (writes that add data under NOSPACE,
//! everything under CORRUPT).

use std::collections::BTreeSet;
use std::sync::RwLock;

use keel_proto::etcdserverpb::{AlarmMember, AlarmType};

use crate::storage::keys::{prefix_end, META_ALARM_PREFIX};
use crate::storage::{SharedEngine, StorageError, Table, WriteBatch};

fn alarm_key(member: u64, alarm: i32) -> Vec<u8> {
    let mut k = META_ALARM_PREFIX.to_vec();
    k.extend_from_slice(&member.to_be_bytes());
    k.extend_from_slice(&alarm.to_be_bytes());
    k
}

#[derive(Default)]
pub struct AlarmStore {
    active: RwLock<BTreeSet<(u64, i32)>>,
}

impl AlarmStore {
    pub fn load(engine: &SharedEngine) -> Result<Self, StorageError> {
        let store = Self::default();
        store.reload(engine)?;
        Ok(store)
    }

    pub fn reload(&self, engine: &SharedEngine) -> Result<(), StorageError> {
        let mut set = BTreeSet::new();
        let end = prefix_end(META_ALARM_PREFIX).unwrap_or_default();
        engine.scan(Table::Meta, META_ALARM_PREFIX, Some(&end), &mut |k, _| {
            let rest = &k[META_ALARM_PREFIX.len()..];
            if rest.len() == 12 {
                let member = u64::from_be_bytes(rest[..8].try_into().unwrap_or_default());
                let alarm = i32::from_be_bytes(rest[8..].try_into().unwrap_or_default());
                set.insert((member, alarm));
            }
            Ok(true)
        })?;
        if let Ok(mut a) = self.active.write() {
            *a = set;
        }
        self.export();
        Ok(())
    }

    fn export(&self) {
        crate::metrics::ALARMS.reset();
        for (m, a) in self.list(AlarmType::None as i32) {
            let name = AlarmType::try_from(a).map(|t| t.as_str_name()).unwrap_or("UNKNOWN");
            crate::metrics::ALARMS.with_label_values(&[&format!("{m:x}"), name]).set(1.0);
        }
    }

    /// Active alarms of `alarm` type (NONE: all), as (member, type).
    pub fn list(&self, alarm: i32) -> Vec<(u64, i32)> {
        let a = self.active.read().map(|a| a.clone()).unwrap_or_default();
        a.into_iter().filter(|(_, t)| alarm == AlarmType::None as i32 || *t == alarm).collect()
    }

    pub fn members(&self, alarm: i32) -> Vec<AlarmMember> {
        self.list(alarm).into_iter().map(|(member_id, alarm)| AlarmMember { member_id, alarm }).collect()
    }

    pub fn is_active(&self, alarm: AlarmType) -> bool {
        !self.list(alarm as i32).is_empty()
    }

    /// Raises an alarm; returns it if it was not already raised.
    pub fn activate(&self, member: u64, alarm: i32, batch: &mut WriteBatch) -> Option<AlarmMember> {
        let mut a = self.active.write().ok()?;
        if !a.insert((member, alarm)) {
            return None;
        }
        drop(a);
        batch.put(Table::Meta, alarm_key(member, alarm), Vec::new());
        self.export();
        Some(AlarmMember { member_id: member, alarm })
    }

    /// Clears an alarm; returns it if it was raised.
    pub fn deactivate(&self, member: u64, alarm: i32, batch: &mut WriteBatch) -> Option<AlarmMember> {
        let mut a = self.active.write().ok()?;
        if !a.remove(&(member, alarm)) {
            return None;
        }
        drop(a);
        batch.delete(Table::Meta, alarm_key(member, alarm));
        self.export();
        Some(AlarmMember { member_id: member, alarm })
    }

    /// etcd's Status.errors lines for active alarms.
    pub fn status_errors(&self) -> Vec<String> {
        self.list(AlarmType::None as i32)
            .into_iter()
            .map(|(m, a)| {
                let name = AlarmType::try_from(a).map(|t| t.as_str_name()).unwrap_or("UNKNOWN");
                format!("memberID:{m} alarm:{name} ")
            })
            .collect()
    }
}
