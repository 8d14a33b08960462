//! Taking a mapped file's page faults in one call, ahead of the copy that reads the pages.
//!
//! Reading a memory-mapped tensor faults its pages into the process one fault at a time (16
//! pages a fault with fault-around), each a trap into the kernel on the reading thread.
//! `MADV_POPULATE_READ` (Linux 5.14) maps a whole range in one call, so the thread that copies
//! the bytes next (the CUDA backend's staging threads) does not stop at every 64 KiB. On older
//! kernels, or for memory that is not a mapping, the call fails and nothing changes: the copy
//! takes the faults as before.

/// `MADV_POPULATE_READ` (linux/mman.h; not in every libc crate version).
const MADV_POPULATE_READ: libc::c_int = 22;

/// Maps the pages of `bytes` readable into this process (populating page tables from the page
/// cache, reading from disk what is not cached). Returns whether the kernel did it.
pub fn populate_read(bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return true;
    }
    let page = page_size();
    let start = bytes.as_ptr() as usize & !(page - 1);
    let end = bytes.as_ptr() as usize + bytes.len();
    // SAFETY: the range covers pages of `bytes`, which are mapped (a slice is valid memory);
    // MADV_POPULATE_READ only faults them in, it changes no contents.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_READ) == 0 }
}

/// The host's page size (4 KiB where the system does not say).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn populates_a_mapped_file_and_leaves_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: a private read-only mapping of a file nobody else writes.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        // An unaligned piece in the middle; kernels before 5.14 say no, and that is fine.
        let ok = populate_read(&map[100..9000]);
        let _ = ok;
        assert_eq!(&map[..], &data[..]);
        assert!(populate_read(&[]));
    }
}
