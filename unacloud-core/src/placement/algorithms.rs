//! The placement algorithms over a [`Ledger`]: First Fit (plain, decreasing,
//! singleton) and Round Robin and Random on per-profile segment trees, Best Fit (and
//! Sorting) and Disk-aware on an ordered index of free resources.

use super::*;

/// Segment trees over hosts, one per hardware profile: leaf `i` holds the free disk of
/// host `i` if it has the profile's cores and memory free, and -1 if not; inner nodes hold
/// the maximum. "The first host from a position that fits a VM" and "every host that
/// fits" are then exact `O(log n)` (resp. output-sized) searches.
pub(super) struct FitTree {
    pub(super) size: usize,
    pub(super) layers: Vec<Vec<i128>>,
}

/// Index of `p` in [`HardwareProfile::ALL`].
pub(super) fn profile_index(p: HardwareProfile) -> usize {
    HardwareProfile::ALL
        .iter()
        .position(|q| *q == p)
        .unwrap_or_default()
}

impl FitTree {
    /// A tree whose leaf `i` holds the free resources of host `order[i]`.
    pub(super) fn new(ledger: &Ledger<'_>, order: &[usize]) -> Self {
        let size = order.len().next_power_of_two().max(1);
        let mut t = FitTree {
            size,
            layers: vec![vec![-1; 2 * size]; HardwareProfile::ALL.len()],
        };
        for (i, &h) in order.iter().enumerate() {
            t.set_leaf(i, (ledger.cores[h], ledger.mem[h], ledger.disk[h]));
        }
        for layer in &mut t.layers {
            for p in (1..size).rev() {
                layer[p] = layer[2 * p].max(layer[2 * p + 1]);
            }
        }
        t
    }

    pub(super) fn set_leaf(&mut self, i: usize, (c, m, d): (u32, u64, u64)) {
        for (k, profile) in HardwareProfile::ALL.iter().enumerate() {
            let fits = c >= profile.cores() && m >= profile.memory_mb();
            self.layers[k][self.size + i] = if fits { i128::from(d) } else { -1 };
        }
    }

    /// Sets leaf `i` to the given free cores, memory and disk.
    pub(super) fn set(&mut self, i: usize, free: (u32, u64, u64)) {
        self.set_leaf(i, free);
        for layer in &mut self.layers {
            let mut p = self.size + i;
            while p > 1 {
                p /= 2;
                layer[p] = layer[2 * p].max(layer[2 * p + 1]);
            }
        }
    }

    /// The first leaf `>= from` with room for `profile` and `disk` bytes.
    pub(super) fn first_from(
        &self,
        from: usize,
        profile: HardwareProfile,
        disk: u64,
    ) -> Option<usize> {
        let layer = &self.layers[profile_index(profile)];
        self.search(layer, 1, 0, self.size, from, i128::from(disk))
    }

    pub(super) fn search(
        &self,
        layer: &[i128],
        p: usize,
        lo: usize,
        hi: usize,
        from: usize,
        disk: i128,
    ) -> Option<usize> {
        if hi <= from || layer[p] < disk {
            return None;
        }
        if p >= self.size {
            return Some(lo);
        }
        let mid = (lo + hi) / 2;
        self.search(layer, 2 * p, lo, mid, from, disk)
            .or_else(|| self.search(layer, 2 * p + 1, mid, hi, from, disk))
    }

    /// Every leaf with room for `profile` and `disk` bytes, in order.
    pub(super) fn all_fitting(&self, profile: HardwareProfile, disk: u64, out: &mut Vec<usize>) {
        let layer = &self.layers[profile_index(profile)];
        let disk = i128::from(disk);
        let mut stack = vec![(1usize, 0usize, self.size)];
        while let Some((p, lo, hi)) = stack.pop() {
            if layer[p] < disk {
                continue;
            }
            if p >= self.size {
                out.push(lo);
                continue;
            }
            let mid = (lo + hi) / 2;
            // Right first so that leaves come out in order.
            stack.push((2 * p + 1, mid, hi));
            stack.push((2 * p, lo, mid));
        }
    }
}

pub(super) fn identity(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// First Fit (optionally over hosts sorted by free resources, most first), or Singleton.
pub(super) fn first_fit(ledger: &mut Ledger<'_>, decreasing: bool, singleton: bool) {
    let mut order = identity(ledger.hosts.len());
    if decreasing {
        // Stable: ties keep the order given.
        order.sort_by(|&a, &b| {
            (ledger.cores[b], ledger.mem[b], ledger.disk[b]).cmp(&(
                ledger.cores[a],
                ledger.mem[a],
                ledger.disk[a],
            ))
        });
    }
    let mut tree = FitTree::new(ledger, &order);
    for v in 0..ledger.vms.len() {
        let need = ledger.need(v);
        if let Some(i) = tree.first_from(0, ledger.vms[v].profile, need.2) {
            let h = order[i];
            ledger.assign(v, h, need.2);
            let left = if singleton {
                (0, 0, 0)
            } else {
                (ledger.cores[h], ledger.mem[h], ledger.disk[h])
            };
            tree.set(i, left);
        }
    }
}

/// Round Robin: each VM goes to the next host after the previous VM's host that fits.
pub(super) fn round_robin(ledger: &mut Ledger<'_>) {
    let n = ledger.hosts.len();
    let mut tree = FitTree::new(ledger, &identity(n));
    let mut cursor = 0;
    for v in 0..ledger.vms.len() {
        let need = ledger.need(v);
        let profile = ledger.vms[v].profile;
        let found = tree
            .first_from(cursor, profile, need.2)
            .or_else(|| tree.first_from(0, profile, need.2));
        if let Some(h) = found {
            ledger.assign(v, h, need.2);
            tree.set(h, (ledger.cores[h], ledger.mem[h], ledger.disk[h]));
            cursor = (h + 1) % n;
        }
    }
}

/// Random: a uniformly chosen host among those the VM fits on.
pub(super) fn random(ledger: &mut Ledger<'_>, seed: u64) {
    const TRIES: usize = 8;
    let n = ledger.hosts.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tree = FitTree::new(ledger, &identity(n));
    // The smallest need of any VM: hosts below it in some dimension can take no VM and
    // leave the sampling pool.
    let min = (0..ledger.vms.len())
        .map(|v| ledger.need(v))
        .fold((u32::MAX, u64::MAX, u64::MAX), |(a, b, c), (x, y, z)| {
            (a.min(x), b.min(y), c.min(z))
        });
    let mut alive: Vec<usize> = (0..n).filter(|&h| ledger.fits(h, min)).collect();
    let mut pos: Vec<usize> = vec![usize::MAX; n];
    for (i, &h) in alive.iter().enumerate() {
        pos[h] = i;
    }
    let mut scratch = Vec::new();
    for v in 0..ledger.vms.len() {
        let need = ledger.need(v);
        // Rejection sampling over the live hosts is uniform over the fitting ones; when
        // it keeps missing, choose uniformly from the explicit list of fitting hosts.
        let mut pick = None;
        for _ in 0..TRIES {
            if alive.is_empty() {
                break;
            }
            let h = alive[rng.gen_range(0..alive.len() as u64) as usize];
            if ledger.fits(h, need) {
                pick = Some(h);
                break;
            }
        }
        if pick.is_none() && !alive.is_empty() {
            scratch.clear();
            tree.all_fitting(ledger.vms[v].profile, need.2, &mut scratch);
            if !scratch.is_empty() {
                pick = Some(scratch[rng.gen_range(0..scratch.len() as u64) as usize]);
            }
        }
        let Some(h) = pick else { continue };
        ledger.assign(v, h, need.2);
        tree.set(h, (ledger.cores[h], ledger.mem[h], ledger.disk[h]));
        if !ledger.fits(h, min) && pos[h] != usize::MAX {
            let i = pos[h];
            alive.swap_remove(i);
            if let Some(&moved) = alive.get(i) {
                pos[moved] = i;
            }
            pos[h] = usize::MAX;
        }
    }
}

/// Key of a host in a [`BestIndex`]: preference group, then free resources, then index.
pub(super) type Key = (u8, u32, u64, u64, usize);

/// Hosts ordered by (group, free cores, free memory, free disk, index).
#[derive(Default)]
pub(super) struct BestIndex {
    pub(super) set: BTreeSet<Key>,
}

impl BestIndex {
    /// The smallest key in `group` whose host fits `need`.
    ///
    /// Walks the ordered set from the need upwards and jumps over runs that cannot fit
    /// (same cores with too little memory; same cores and memory with too little disk), so
    /// a query costs a few `O(log n)` seeks instead of a scan.
    pub(super) fn best(&self, group: u8, (c, m, d): (u32, u64, u64)) -> Option<usize> {
        let mut cursor: Key = (group, c, m, d, 0);
        loop {
            let &(g, cc, mm, dd, h) = self.set.range(cursor..).next()?;
            if g != group {
                return None;
            }
            if mm < m {
                cursor = (g, cc, m, d, 0);
            } else if dd < d {
                cursor = (g, cc, mm, d, 0);
            } else {
                return Some(h);
            }
        }
    }
}

pub(super) fn key(ledger: &Ledger<'_>, group: u8, h: usize) -> Key {
    (group, ledger.cores[h], ledger.mem[h], ledger.disk[h], h)
}

/// Best Fit; with `prefer_users` (Sorting), hosts with a user logged in come first.
pub(super) fn best_fit(ledger: &mut Ledger<'_>, prefer_users: bool) {
    let group = |h: &Host| u8::from(prefer_users && !h.user_logged_in);
    let groups: &[u8] = if prefer_users { &[0, 1] } else { &[0] };
    let mut index = BestIndex::default();
    for (h, host) in ledger.hosts.iter().enumerate() {
        index.set.insert(key(ledger, group(host), h));
    }
    for v in 0..ledger.vms.len() {
        let need = ledger.need(v);
        let Some(h) = groups.iter().find_map(|&g| index.best(g, need)) else {
            continue;
        };
        let g = group(&ledger.hosts[h]);
        index.set.remove(&key(ledger, g, h));
        ledger.assign(v, h, need.2);
        index.set.insert(key(ledger, g, h));
    }
}

/// Disk-aware Best Fit: first among hosts holding the VM's template (no copy, no extra
/// disk), then among all hosts with room for the template and the VM's own disk.
pub(super) fn disk_aware(ledger: &mut Ledger<'_>) {
    let mut all = BestIndex::default();
    let mut by_template: Vec<BestIndex> = (0..ledger.templates.sizes.len())
        .map(|_| BestIndex::default())
        .collect();
    for h in 0..ledger.hosts.len() {
        all.set.insert(key(ledger, 0, h));
        for &t in &ledger.templates.present[h] {
            by_template[t].set.insert(key(ledger, 0, h));
        }
    }
    for v in 0..ledger.vms.len() {
        let (c, m, d) = ledger.need(v);
        let t = ledger.templates.of_vm[v];
        let t_bytes = ledger.templates.sizes[t];
        let (h, disk) = if let Some(h) = by_template[t].best(0, (c, m, d)) {
            (h, d)
        } else {
            // A host holding the template that fits d + t_bytes would fit d and have been
            // found above, so whatever this finds lacks the template.
            let with_template = d.saturating_add(t_bytes);
            match all.best(0, (c, m, with_template)) {
                Some(h) => (h, with_template),
                None => continue,
            }
        };
        let old = key(ledger, 0, h);
        all.set.remove(&old);
        for &pt in &ledger.templates.present[h] {
            by_template[pt].set.remove(&old);
        }
        ledger.assign(v, h, disk);
        let new = key(ledger, 0, h);
        all.set.insert(new);
        for &pt in &ledger.templates.present[h] {
            by_template[pt].set.insert(new);
        }
    }
}
