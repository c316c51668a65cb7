//! What a path that is neither a regular file nor a folder is (a FIFO, a device, a socket), so
//! messages name it instead of reading it or calling it missing.

/// What a file that is neither a regular file nor a folder is, for messages.
#[cfg(unix)]
pub(crate) fn special_file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a named pipe (FIFO)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
pub(crate) fn special_file_kind(_: &std::fs::FileType) -> &'static str {
    "not a regular file"
}
