//! Placement of tenants' pinned reservations across devices, and rebalancing with few moves.
//!
//! [`place_tenants`] is best-fit decreasing: tenants in decreasing order of demand, each onto
//! the device whose free capacity fits it most tightly. Best fit packs at least as well as
//! first fit on typical inputs and keeps large holes for large tenants; both are within
//! 11/9 OPT + 1 devices for bin packing. What does not fit is reported, not dropped.
//!
//! [`rebalance`] starts from the current plan: every tenant stays where it is while its device
//! still holds it. On a device that overflows (a demand grew, or the device shrank) it moves as
//! few tenants as possible: repeatedly the smallest tenant that alone covers the excess, else
//! the largest. This removes the minimum number of tenants from that device (the property tests
//! check it), and when one tenant suffices, the smallest one. Moved, new and previously
//! unplaced tenants are then placed best fit decreasing into the space left. It is not a global
//! optimum: a tenant moved off one device may, for instance, find no room elsewhere while a
//! different choice would have fitted everyone.

use std::collections::{HashMap, HashSet};
use std::fmt;

use kvc_core::TenantId;
use thiserror::Error;

/// A device (an accelerator) with KV memory.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DeviceId(pub u32);

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device#{}", self.0)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device#{}", self.0)
    }
}

/// A device and the KV blocks it can give to pinned reservations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Device {
    /// The device.
    pub id: DeviceId,
    /// Blocks available for reservations.
    pub capacity: usize,
}

/// A tenant's estimated critical demand: the pinned reservation it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Demand {
    /// The tenant.
    pub tenant: TenantId,
    /// Blocks.
    pub blocks: usize,
}

/// A tenant's reservation placed on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Assignment {
    /// The tenant.
    pub tenant: TenantId,
    /// Its device.
    pub device: DeviceId,
    /// Blocks reserved there.
    pub blocks: usize,
}

/// Where every tenant's reservation goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DevicePlan {
    /// Placed reservations, in tenant order.
    pub assigned: Vec<Assignment>,
    /// Reservations that fit on no device, in tenant order.
    pub unplaced: Vec<Demand>,
}

impl DevicePlan {
    /// The device of a tenant's reservation.
    #[must_use]
    pub fn device_of(&self, tenant: TenantId) -> Option<DeviceId> {
        self.assigned
            .iter()
            .find(|a| a.tenant == tenant)
            .map(|a| a.device)
    }

    /// Blocks reserved on a device (saturating at `usize::MAX` in a plan built by hand).
    #[must_use]
    pub fn used(&self, device: DeviceId) -> usize {
        self.assigned
            .iter()
            .filter(|a| a.device == device)
            .fold(0, |sum, a| sum.saturating_add(a.blocks))
    }
}

/// A tenant whose reservation changed device (or no longer fits anywhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Move {
    /// The tenant.
    pub tenant: TenantId,
    /// Where it was.
    pub from: DeviceId,
    /// Where it goes; `None`: it fits nowhere now.
    pub to: Option<DeviceId>,
}

/// The result of [`rebalance`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rebalanced {
    /// The new plan.
    pub plan: DevicePlan,
    /// Tenants that changed device, in tenant order.
    pub moves: Vec<Move>,
}

/// Why devices or demands were refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DevicePlanError {
    /// A device is listed twice.
    #[error("{device} is listed twice")]
    DuplicateDevice {
        /// The device.
        device: DeviceId,
    },
    /// A tenant is listed twice.
    #[error("{tenant} has two demands")]
    DuplicateTenant {
        /// The tenant.
        tenant: TenantId,
    },
}

fn validate(devices: &[Device], demands: &[Demand]) -> Result<(), DevicePlanError> {
    let mut seen = HashSet::with_capacity(devices.len());
    for d in devices {
        if !seen.insert(d.id) {
            return Err(DevicePlanError::DuplicateDevice { device: d.id });
        }
    }
    let mut seen = HashSet::with_capacity(demands.len());
    for d in demands {
        if !seen.insert(d.tenant) {
            return Err(DevicePlanError::DuplicateTenant { tenant: d.tenant });
        }
    }
    Ok(())
}

/// Best-fit decreasing of `pending` into the free capacity `free` (parallel to `devices`).
fn best_fit(
    devices: &[Device],
    free: &mut [usize],
    mut pending: Vec<Demand>,
    plan: &mut DevicePlan,
) {
    pending.sort_unstable_by(|a, b| b.blocks.cmp(&a.blocks).then(a.tenant.cmp(&b.tenant)));
    for demand in pending {
        let best = free
            .iter()
            .enumerate()
            .filter(|&(_, &f)| f >= demand.blocks)
            .min_by_key(|&(i, &f)| (f, i))
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                free[i] -= demand.blocks;
                plan.assigned.push(Assignment {
                    tenant: demand.tenant,
                    device: devices[i].id,
                    blocks: demand.blocks,
                });
            }
            None => plan.unplaced.push(demand),
        }
    }
}

fn sort_plan(plan: &mut DevicePlan) {
    plan.assigned.sort_unstable_by_key(|a| a.tenant);
    plan.unplaced.sort_unstable_by_key(|d| d.tenant);
}

/// Places every tenant's reservation on a device, best fit decreasing.
///
/// ```
/// use kvc_pin::TenantId;
/// use kvc_pin::{place_tenants, Demand, Device, DeviceId};
///
/// let devices = [Device { id: DeviceId(0), capacity: 100 }, Device { id: DeviceId(1), capacity: 60 }];
/// let demands = [
///     Demand { tenant: TenantId(1), blocks: 70 },
///     Demand { tenant: TenantId(2), blocks: 50 },
///     Demand { tenant: TenantId(3), blocks: 40 },
///     Demand { tenant: TenantId(4), blocks: 30 },
/// ];
/// let plan = place_tenants(&devices, &demands)?;
/// assert_eq!(plan.device_of(TenantId(1)), Some(DeviceId(0)));
/// assert_eq!(plan.device_of(TenantId(2)), Some(DeviceId(1)));
/// assert_eq!(plan.unplaced, [Demand { tenant: TenantId(3), blocks: 40 }]);
/// assert_eq!(plan.used(DeviceId(0)), 100);
/// # Ok::<(), kvc_pin::DevicePlanError>(())
/// ```
pub fn place_tenants(
    devices: &[Device],
    demands: &[Demand],
) -> Result<DevicePlan, DevicePlanError> {
    validate(devices, demands)?;
    let mut free: Vec<usize> = devices.iter().map(|d| d.capacity).collect();
    let mut plan = DevicePlan::default();
    best_fit(devices, &mut free, demands.to_vec(), &mut plan);
    sort_plan(&mut plan);
    Ok(plan)
}

/// Re-places reservations after demands or devices changed, moving few tenants (see the
/// module docs). Tenants absent from `demands` are dropped; new ones are placed.
///
/// ```
/// use kvc_pin::TenantId;
/// use kvc_pin::{place_tenants, rebalance, Demand, Device, DeviceId, Move};
///
/// let devices = [Device { id: DeviceId(0), capacity: 100 }, Device { id: DeviceId(1), capacity: 100 }];
/// let mut demands = vec![
///     Demand { tenant: TenantId(1), blocks: 60 },
///     Demand { tenant: TenantId(2), blocks: 30 },
///     Demand { tenant: TenantId(3), blocks: 50 },
/// ];
/// let plan = place_tenants(&devices, &demands)?;
/// demands[1].blocks = 45; // tenant 2 grows: its device overflows
/// let r = rebalance(&plan, &devices, &demands)?;
/// assert_eq!(r.moves.len(), 1);
/// assert!(r.plan.unplaced.is_empty());
/// # Ok::<(), kvc_pin::DevicePlanError>(())
/// ```
pub fn rebalance(
    current: &DevicePlan,
    devices: &[Device],
    demands: &[Demand],
) -> Result<Rebalanced, DevicePlanError> {
    validate(devices, demands)?;
    let index: HashMap<DeviceId, usize> =
        devices.iter().enumerate().map(|(i, d)| (d.id, i)).collect();
    let before: HashMap<TenantId, DeviceId> = current
        .assigned
        .iter()
        .map(|a| (a.tenant, a.device))
        .collect();

    // Keep every tenant on its device, then relieve the devices that overflow.
    let mut kept: Vec<Vec<Demand>> = vec![Vec::new(); devices.len()];
    let mut pending = Vec::new();
    for d in demands {
        match before.get(&d.tenant).and_then(|dev| index.get(dev)) {
            Some(&i) => kept[i].push(*d),
            None => pending.push(*d),
        }
    }
    let mut free = Vec::with_capacity(devices.len());
    for (i, device) in devices.iter().enumerate() {
        let on = &mut kept[i];
        // Summed wide: demands of up to `usize::MAX` blocks each must not overflow.
        let mut used: u128 = on.iter().map(|d| d.blocks as u128).sum();
        while used > device.capacity as u128 {
            let excess = used - device.capacity as u128;
            // The smallest tenant that alone covers the excess, else the largest.
            let pick = on
                .iter()
                .enumerate()
                .filter(|(_, d)| d.blocks as u128 >= excess)
                .min_by_key(|(_, d)| (d.blocks, d.tenant))
                .or_else(|| {
                    on.iter()
                        .enumerate()
                        .max_by_key(|(_, d)| (d.blocks, std::cmp::Reverse(d.tenant)))
                })
                .map(|(j, _)| j);
            let Some(j) = pick else { break };
            let evicted = on.swap_remove(j);
            used -= evicted.blocks as u128;
            pending.push(evicted);
        }
        // At most the capacity now (or nothing is left on the device).
        free.push(device.capacity - used.min(device.capacity as u128) as usize);
    }

    let mut plan = DevicePlan::default();
    for (i, on) in kept.iter().enumerate() {
        plan.assigned.extend(on.iter().map(|d| Assignment {
            tenant: d.tenant,
            device: devices[i].id,
            blocks: d.blocks,
        }));
    }
    best_fit(devices, &mut free, pending, &mut plan);
    sort_plan(&mut plan);

    let mut moves = Vec::new();
    for d in demands {
        let Some(&from) = before.get(&d.tenant) else {
            continue;
        };
        let to = plan.device_of(d.tenant);
        if to != Some(from) {
            moves.push(Move {
                tenant: d.tenant,
                from,
                to,
            });
        }
    }
    moves.sort_unstable_by_key(|m| m.tenant);
    Ok(Rebalanced { plan, moves })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: u32, capacity: usize) -> Device {
        Device {
            id: DeviceId(id),
            capacity,
        }
    }

    fn dem(tenant: u32, blocks: usize) -> Demand {
        Demand {
            tenant: TenantId(tenant),
            blocks,
        }
    }

    #[test]
    fn duplicates_are_refused() {
        assert_eq!(
            place_tenants(&[dev(1, 5), dev(1, 6)], &[]),
            Err(DevicePlanError::DuplicateDevice {
                device: DeviceId(1)
            })
        );
        assert_eq!(
            place_tenants(&[dev(1, 5)], &[dem(2, 1), dem(2, 1)]),
            Err(DevicePlanError::DuplicateTenant {
                tenant: TenantId(2)
            })
        );
    }

    #[test]
    fn best_fit_places_what_first_fit_leaves_out() {
        // First fit decreasing: 6 -> device 0 (3 left), 5 -> device 1 (1 left), 4 fits nowhere.
        // Best fit: 6 -> device 1 exactly, 5 and 4 -> device 0.
        let plan =
            place_tenants(&[dev(0, 9), dev(1, 6)], &[dem(1, 6), dem(2, 5), dem(3, 4)]).unwrap();
        assert!(plan.unplaced.is_empty());
        assert_eq!(plan.device_of(TenantId(1)), Some(DeviceId(1)));
        assert_eq!(plan.used(DeviceId(0)), 9);
    }

    #[test]
    fn unchanged_demands_move_nothing_and_removed_devices_move_their_tenants() {
        let devices = [dev(0, 50), dev(1, 50), dev(2, 50)];
        let demands = [dem(1, 40), dem(2, 30), dem(3, 20), dem(4, 10)];
        let plan = place_tenants(&devices, &demands).unwrap();
        let same = rebalance(&plan, &devices, &demands).unwrap();
        assert!(same.moves.is_empty());
        assert_eq!(same.plan, plan);

        let gone = plan.device_of(TenantId(1)).unwrap();
        let left: Vec<Device> = devices.iter().copied().filter(|d| d.id != gone).collect();
        let r = rebalance(&plan, &left, &demands).unwrap();
        assert!(r.moves.iter().all(|m| m.from == gone));
        assert!(r.moves.iter().any(|m| m.tenant == TenantId(1)));
        for d in &left {
            assert!(r.plan.used(d.id) <= d.capacity);
        }
    }

    #[test]
    fn overflow_moves_the_smallest_tenant_that_covers_the_excess() {
        let devices = [dev(0, 100), dev(1, 100)];
        let plan = DevicePlan {
            assigned: vec![
                Assignment {
                    tenant: TenantId(1),
                    device: DeviceId(0),
                    blocks: 50,
                },
                Assignment {
                    tenant: TenantId(2),
                    device: DeviceId(0),
                    blocks: 20,
                },
                Assignment {
                    tenant: TenantId(3),
                    device: DeviceId(0),
                    blocks: 25,
                },
            ],
            unplaced: vec![],
        };
        // Tenant 1 grows to 60: 105 on device 0, excess 5. Moving tenant 2 (20) suffices.
        let r = rebalance(&plan, &devices, &[dem(1, 60), dem(2, 20), dem(3, 25)]).unwrap();
        assert_eq!(
            r.moves,
            vec![Move {
                tenant: TenantId(2),
                from: DeviceId(0),
                to: Some(DeviceId(1))
            }]
        );
    }
}
