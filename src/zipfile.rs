//! Zip archive structure: the completeness check that intake runs before a
//! file is queued, and a small writer of stored (uncompressed) archives for the
//! demo, the tests and the benchmarks.
//!
//! The check reads only the end of the file. An archive is complete when it ends
//! with a valid end of central directory record (EOCD) whose central directory
//! lies inside the file, before the record. A writer that is still appending has
//! not written the EOCD yet, so an incomplete file fails the check.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

const EOCD_SIGNATURE: [u8; 4] = [0x50, 0x4b, 0x05, 0x06];
const ZIP64_LOCATOR_SIGNATURE: [u8; 4] = [0x50, 0x4b, 0x06, 0x07];
const ZIP64_EOCD_SIGNATURE: [u8; 4] = [0x50, 0x4b, 0x06, 0x06];
const EOCD_LEN: u64 = 22;
const ZIP64_LOCATOR_LEN: u64 = 20;
/// The EOCD ends with a comment of at most 65535 bytes.
const MAX_COMMENT_LEN: u64 = u16::MAX as u64;

/// The reason a file is not a complete zip archive. The text is written to the
/// `.reason` file beside a rejected file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZipError {
    #[error("not a zip archive: the file is empty")]
    Empty,
    #[error("not a complete zip archive: no end of central directory record in the last {searched} bytes")]
    NoEndRecord { searched: u64 },
    #[error("not a complete zip archive: the central directory (offset {offset}, {size} bytes) lies outside the file")]
    DirectoryOutOfBounds { offset: u64, size: u64 },
    #[error("not a complete zip archive: {0}")]
    Io(String),
}

/// Checks that `file` is a complete zip archive of `len` bytes.
pub fn check_complete(file: &mut File, len: u64) -> Result<(), ZipError> {
    if len == 0 {
        return Err(ZipError::Empty);
    }
    if len < EOCD_LEN {
        return Err(ZipError::NoEndRecord { searched: len });
    }
    let tail_len = len.min(EOCD_LEN + MAX_COMMENT_LEN + ZIP64_LOCATOR_LEN);
    let tail_start = len - tail_len;
    let mut tail = vec![0u8; tail_len as usize];
    file.seek(SeekFrom::Start(tail_start))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(|err| ZipError::Io(format!("reading the end of the file failed: {err}")))?;

    // Search backwards, because the comment may itself contain the signature
    // bytes; the record that is valid is the one whose comment ends the file.
    let mut position = tail.len().saturating_sub(EOCD_LEN as usize) as isize;
    while position >= 0 {
        let at = position as usize;
        if tail[at..at + 4] == EOCD_SIGNATURE {
            let comment_len = u16::from_le_bytes([tail[at + 20], tail[at + 21]]) as usize;
            if at + EOCD_LEN as usize + comment_len == tail.len() {
                return check_directory_bounds(file, &tail, at, tail_start);
            }
        }
        position -= 1;
    }
    Err(ZipError::NoEndRecord { searched: tail_len })
}

fn check_directory_bounds(
    file: &mut File,
    tail: &[u8],
    at: usize,
    tail_start: u64,
) -> Result<(), ZipError> {
    let eocd_offset = tail_start + at as u64;
    let read_u32 = |i: usize| u32::from_le_bytes([tail[i], tail[i + 1], tail[i + 2], tail[i + 3]]);
    let mut size = read_u32(at + 12) as u64;
    let mut offset = read_u32(at + 16) as u64;
    let mut directory_end = eocd_offset;

    // Zip64 archives store 0xFFFFFFFF here and the real values in the zip64
    // end record, which a locator just before the EOCD points to.
    if (size == u32::MAX as u64 || offset == u32::MAX as u64) && at >= ZIP64_LOCATOR_LEN as usize {
        let locator = at - ZIP64_LOCATOR_LEN as usize;
        if tail[locator..locator + 4] == ZIP64_LOCATOR_SIGNATURE {
            let record_offset =
                u64::from_le_bytes(tail[locator + 8..locator + 16].try_into().unwrap());
            let mut record = [0u8; 56];
            file.seek(SeekFrom::Start(record_offset))
                .and_then(|_| file.read_exact(&mut record))
                .map_err(|err| {
                    ZipError::Io(format!("reading the zip64 end record failed: {err}"))
                })?;
            if record[0..4] != ZIP64_EOCD_SIGNATURE {
                return Err(ZipError::DirectoryOutOfBounds { offset, size });
            }
            size = u64::from_le_bytes(record[40..48].try_into().unwrap());
            offset = u64::from_le_bytes(record[48..56].try_into().unwrap());
            directory_end = record_offset;
        }
    }
    match offset.checked_add(size) {
        Some(end) if end <= directory_end => Ok(()),
        _ => Err(ZipError::DirectoryOutOfBounds { offset, size }),
    }
}

/// Writes a zip archive with the given entries, stored without compression.
/// Enough for test data and demos; not a general-purpose zip writer (no zip64).
pub fn write_stored<W: Write>(mut out: W, entries: &[(&str, &[u8])]) -> io::Result<()> {
    let mut central = Vec::new();
    let mut offset: u32 = 0;
    for (name, data) in entries {
        let crc = crc32fast::hash(data);
        let name = name.as_bytes();
        let mut local = Vec::with_capacity(30 + name.len());
        local.extend_from_slice(&[0x50, 0x4b, 0x03, 0x04]);
        local.extend_from_slice(&20u16.to_le_bytes()); // version needed
        local.extend_from_slice(&0u16.to_le_bytes()); // flags
        local.extend_from_slice(&0u16.to_le_bytes()); // method: stored
        local.extend_from_slice(&0u32.to_le_bytes()); // time and date
        local.extend_from_slice(&crc.to_le_bytes());
        local.extend_from_slice(&(data.len() as u32).to_le_bytes());
        local.extend_from_slice(&(data.len() as u32).to_le_bytes());
        local.extend_from_slice(&(name.len() as u16).to_le_bytes());
        local.extend_from_slice(&0u16.to_le_bytes());
        local.extend_from_slice(name);
        out.write_all(&local)?;
        out.write_all(data)?;

        central.extend_from_slice(&[0x50, 0x4b, 0x01, 0x02]);
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        central.extend_from_slice(&20u16.to_le_bytes()); // version needed
        central.extend_from_slice(&[0; 6]); // flags, method
        central.extend_from_slice(&0u32.to_le_bytes()); // time and date
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 12]); // extra, comment, disk, attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name);
        offset += (local.len() + data.len()) as u32;
    }
    out.write_all(&central)?;
    let mut eocd = Vec::with_capacity(EOCD_LEN as usize);
    eocd.extend_from_slice(&EOCD_SIGNATURE);
    eocd.extend_from_slice(&[0; 4]); // disk numbers
    eocd.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    eocd.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    eocd.extend_from_slice(&(central.len() as u32).to_le_bytes());
    eocd.extend_from_slice(&offset.to_le_bytes());
    eocd.extend_from_slice(&0u16.to_le_bytes());
    out.write_all(&eocd)
}

/// Returns a stored zip archive of one entry, `name`, holding `data`.
pub fn stored_archive(name: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 128);
    write_stored(&mut out, &[(name, data)]).expect("writing to a Vec does not fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_bytes(bytes: &[u8]) -> Result<(), ZipError> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        check_complete(&mut file, bytes.len() as u64)
    }

    #[test]
    fn written_archive_is_complete() {
        let archive = stored_archive("session.json", b"{\"events\":[]}");
        assert_eq!(check_bytes(&archive), Ok(()));
    }

    #[test]
    fn every_truncation_is_incomplete() {
        let archive = stored_archive("a.txt", &[7u8; 300]);
        for len in 0..archive.len() {
            assert!(
                check_bytes(&archive[..len]).is_err(),
                "prefix of {len} bytes passed"
            );
        }
    }

    #[test]
    fn empty_file_is_rejected() {
        assert_eq!(check_bytes(b""), Err(ZipError::Empty));
    }

    #[test]
    fn text_file_is_rejected() {
        let result = check_bytes(b"hello, this is not a zip archive\n");
        assert!(matches!(result, Err(ZipError::NoEndRecord { .. })));
    }

    #[test]
    fn directory_offset_past_file_is_rejected() {
        let mut archive = stored_archive("a.txt", b"abc");
        let len = archive.len();
        archive[len - 6..len - 2].copy_from_slice(&u32::MAX.to_le_bytes()[..]);
        archive[len - 6] = 0xfe;
        assert!(matches!(
            check_bytes(&archive),
            Err(ZipError::DirectoryOutOfBounds { .. })
        ));
    }

    #[test]
    fn archive_with_comment_is_complete() {
        let mut archive = stored_archive("a.txt", b"abc");
        let len = archive.len();
        archive[len - 2..].copy_from_slice(&5u16.to_le_bytes());
        archive.extend_from_slice(b"hello");
        assert_eq!(check_bytes(&archive), Ok(()));
    }
}
