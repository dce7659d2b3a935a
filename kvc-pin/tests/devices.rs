//! Property tests of placing tenants' reservations across devices and rebalancing them.

use std::collections::HashMap;

use kvc_core::TenantId;
use kvc_pin::{Demand, Device, DeviceId, DevicePlan, place_tenants, rebalance};
use proptest::prelude::*;

fn devices() -> impl Strategy<Value = Vec<Device>> {
    proptest::collection::vec(0..200usize, 1..6).prop_map(|caps| {
        caps.into_iter()
            .enumerate()
            .map(|(i, capacity)| Device {
                id: DeviceId(i as u32),
                capacity,
            })
            .collect()
    })
}

fn demands() -> impl Strategy<Value = Vec<Demand>> {
    proptest::collection::vec(0..120usize, 0..14).prop_map(|sizes| {
        sizes
            .into_iter()
            .enumerate()
            .map(|(i, blocks)| Demand {
                tenant: TenantId(i as u32),
                blocks,
            })
            .collect()
    })
}

/// Every tenant exactly once, with its demand; no device over capacity.
fn check_plan(plan: &DevicePlan, devices: &[Device], demands: &[Demand]) -> Result<(), String> {
    let mut seen: HashMap<TenantId, usize> = HashMap::new();
    for a in &plan.assigned {
        if seen.insert(a.tenant, a.blocks).is_some() {
            return Err(format!("{} twice", a.tenant));
        }
        if !devices.iter().any(|d| d.id == a.device) {
            return Err(format!("{} on unknown {}", a.tenant, a.device));
        }
    }
    for u in &plan.unplaced {
        if seen.insert(u.tenant, u.blocks).is_some() {
            return Err(format!("{} twice", u.tenant));
        }
    }
    if seen.len() != demands.len()
        || demands
            .iter()
            .any(|d| seen.get(&d.tenant) != Some(&d.blocks))
    {
        return Err("tenants lost, added or resized".into());
    }
    for d in devices {
        if plan.used(d.id) > d.capacity {
            return Err(format!("{} over capacity", d.id));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn placement_respects_capacity_and_reports_only_what_cannot_fit(
        devices in devices(),
        demands in demands(),
    ) {
        let plan = place_tenants(&devices, &demands).unwrap();
        check_plan(&plan, &devices, &demands).map_err(TestCaseError::fail)?;
        // Free space only shrinks during placement: what was left out fits nowhere at the end.
        let most_free = devices.iter().map(|d| d.capacity - plan.used(d.id)).max().unwrap_or(0);
        for u in &plan.unplaced {
            prop_assert!(u.blocks > most_free);
        }
        // Nothing changed: nothing moves.
        let same = rebalance(&plan, &devices, &demands).unwrap();
        prop_assert!(same.moves.is_empty());
        prop_assert_eq!(&same.plan, &plan);
    }

    #[test]
    fn rebalance_moves_only_off_overflowing_devices_and_as_few_as_possible(
        devices in devices(),
        demands in demands(),
        growth in proptest::collection::vec(0..80usize, 14),
        shrink_device in any::<prop::sample::Index>(),
    ) {
        let plan = place_tenants(&devices, &demands).unwrap();
        let new_demands: Vec<Demand> = demands
            .iter()
            .enumerate()
            .map(|(i, d)| Demand { tenant: d.tenant, blocks: d.blocks + growth[i] })
            .collect();
        let mut new_devices = devices.clone();
        let k = shrink_device.index(new_devices.len());
        new_devices[k].capacity /= 2;
        let r = rebalance(&plan, &new_devices, &new_demands).unwrap();
        check_plan(&r.plan, &new_devices, &new_demands).map_err(TestCaseError::fail)?;

        for dev in &new_devices {
            let mut on: Vec<usize> = plan
                .assigned
                .iter()
                .filter(|a| a.device == dev.id)
                .map(|a| new_demands[a.tenant.get() as usize].blocks)
                .collect();
            let load: usize = on.iter().sum();
            let moved_off = r.moves.iter().filter(|m| m.from == dev.id).count();
            if load <= dev.capacity {
                prop_assert_eq!(moved_off, 0, "{} still fitted its tenants", dev.id);
            } else {
                // The fewest tenants whose removal makes the rest fit: the largest first.
                on.sort_unstable_by(|a, b| b.cmp(a));
                let excess = load - dev.capacity;
                let mut freed = 0;
                let fewest = on.iter().take_while(|&&b| {
                    let more = freed < excess;
                    freed += b;
                    more
                }).count();
                prop_assert_eq!(moved_off, fewest, "{} moved more tenants than needed", dev.id);
            }
        }
    }
}

#[test]
fn demands_of_usize_max_blocks_are_unplaced_not_a_panic() {
    let devices = [
        Device {
            id: DeviceId(0),
            capacity: 100,
        },
        Device {
            id: DeviceId(1),
            capacity: 50,
        },
    ];
    let small: Vec<Demand> = (1..=3)
        .map(|t| Demand {
            tenant: TenantId(t),
            blocks: 10,
        })
        .collect();
    let plan = place_tenants(&devices, &small).unwrap();
    // Every tenant's estimate explodes: summing a device's tenants overflowed.
    let huge: Vec<Demand> = small
        .iter()
        .map(|d| Demand {
            blocks: usize::MAX,
            ..*d
        })
        .collect();
    let r = rebalance(&plan, &devices, &huge).unwrap();
    assert!(r.plan.assigned.is_empty());
    assert_eq!(r.plan.unplaced, huge);
    assert_eq!(r.moves.len(), 3);
    assert!(r.moves.iter().all(|m| m.to.is_none()));
    // A hand-built plan whose reservations sum past usize::MAX saturates.
    assert_eq!(r.plan.used(DeviceId(0)), 0);
    let mut stacked = plan.clone();
    for a in &mut stacked.assigned {
        a.device = DeviceId(0);
        a.blocks = usize::MAX;
    }
    assert_eq!(stacked.used(DeviceId(0)), usize::MAX);
}
