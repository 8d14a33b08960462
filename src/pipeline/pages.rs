//! The pages of a group's mapped inputs: read ahead for the next group, populated just before
//! its compute, dropped from the resident set after it (the page cache keeps them).

use memmap2::Mmap;

use crate::checkpoint::Checkpoint;
use crate::plan::{CopyFrom, Item, ItemKind, Plan};

/// The mapped input tensors an item reads: its source for a copy, every input for a merge.
pub(super) fn inputs_of<'a>(plan: &'a Plan, item: &Item) -> Vec<(&'a Mmap, usize, usize)> {
    let ins = &plan.inputs;
    let mut named: Vec<(&Checkpoint, &str)> = Vec::new();
    match &item.kind {
        ItemKind::Copy { from, name, .. } => named.push((
            match from {
                CopyFrom::Base => &ins.base,
                CopyFrom::Start => ins.start.as_ref().expect("start"),
                CopyFrom::Task(t) => &ins.tasks[*t].model,
            },
            name,
        )),
        ItemKind::Merge { .. } => {
            named.push((&ins.base, item.slot.base.as_deref().unwrap_or(&item.name)));
            if let Some(s) = &ins.start {
                named.push((s, &item.name));
            }
            for (t, n) in ins.tasks.iter().zip(&item.slot.tasks) {
                if let Some(n) = n.as_deref() {
                    named.push((&t.model, n));
                    named.extend(t.grads.iter().map(|g| (g, n)));
                }
            }
        }
    }
    named
        .into_iter()
        .filter_map(|(ck, n)| ck.get(n))
        .map(|(f, t)| (&f.map, t.start, t.nbytes()))
        .collect()
}

/// Asks the kernel to start reading the next group's inputs while this one computes.
pub(super) fn prefetch(plan: &Plan, item: &Item) {
    for (map, start, len) in inputs_of(plan, item) {
        let _ = map.advise_range(memmap2::Advice::WillNeed, start, len);
    }
}

/// Maps a group's input pages into this process just before its compute reads them: one system
/// call per input range (`MADV_POPULATE_READ`, Linux 5.14 and later), where touching the mapping
/// took a page fault every few pages. Elsewhere, or if the kernel refuses, `WILLNEED` (read-ahead).
/// A populate that fails (the file shrank, a read error) is not an error here: the compute's own
/// read of the page raises the SIGBUS that `checkpoint::guard` turns into an error naming the
/// file. Only the group about to be computed is populated, so the mapped inputs resident at once
/// stay one group's, as without it.
pub(super) fn populate(plan: &Plan, item: &Item) {
    for (map, start, len) in inputs_of(plan, item) {
        #[cfg(target_os = "linux")]
        if map
            .advise_range(memmap2::Advice::PopulateRead, start, len)
            .is_ok()
        {
            continue;
        }
        let _ = map.advise_range(memmap2::Advice::WillNeed, start, len);
    }
}

/// Drops a processed merge group's input pages from this process's resident set. They stay in
/// the page cache, so a later pass refaults them cheaply; without this, mapped inputs that were
/// read once count in RSS until the end and the process looks as large as the model.
pub(super) fn release(plan: &Plan, item: &Item) {
    for (map, start, len) in inputs_of(plan, item) {
        // SAFETY: the maps are read-only shared file mappings: MADV_DONTNEED only drops our page
        // table entries; the next access reads the same bytes back from the page cache.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }
}
