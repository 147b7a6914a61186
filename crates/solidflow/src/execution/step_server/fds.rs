//! Sending file descriptors along with bytes over a Unix stream socket (`SCM_RIGHTS`):
//! the parent hands a step's output pipes to the step server with its request.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors one message carries.
const MAX_FDS: usize = 4;

/// A peer that is gone is an error, not a SIGPIPE.
#[cfg(target_os = "linux")]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: libc::c_int = 0;

/// Received descriptors are close-on-exec from the start.
#[cfg(target_os = "linux")]
const RECV_FLAGS: libc::c_int = libc::MSG_CMSG_CLOEXEC;
#[cfg(not(target_os = "linux"))]
const RECV_FLAGS: libc::c_int = 0;

/// Room for the control message of `MAX_FDS` descriptors, aligned for `cmsghdr`.
#[repr(C)]
struct ControlBuffer {
    _align: libc::cmsghdr,
    _space: [u8; 64],
}

/// Writes all of `bytes` to `socket`, the descriptors `fds` riding on the first write.
pub fn send_with_fds(socket: &impl AsRawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS && !bytes.is_empty());
    let mut sent = 0;
    while sent < bytes.len() {
        let rest = &bytes[sent..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: a zeroed msghdr / control buffer are valid; the pointers below point
        // into `iov`, `control` and `fds`, which outlive the sendmsg call; CMSG_* are
        // used on a buffer of CMSG_SPACE(len) bytes.
        let n = unsafe {
            let mut control: ControlBuffer = std::mem::zeroed();
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if sent == 0 && !fds.is_empty() {
                let len = std::mem::size_of_val(fds) as u32;
                msg.msg_control = (&mut control as *mut ControlBuffer).cast();
                msg.msg_controllen = libc::CMSG_SPACE(len) as _;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(len) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    len as usize,
                );
            }
            libc::sendmsg(socket.as_raw_fd(), &msg, SEND_FLAGS)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// Reads once from `socket` into `buf`, collecting descriptors that came along into
/// `fds` (close-on-exec). Returns the number of bytes read (0 at end of stream).
pub fn recv_with_fds(
    socket: &impl AsRawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: as in `send_with_fds`; the kernel writes at most msg_controllen bytes
        // of control data, and each SCM_RIGHTS descriptor is owned by us from then on.
        let n = unsafe {
            let mut control: ControlBuffer = std::mem::zeroed();
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = (&mut control as *mut ControlBuffer).cast();
            msg.msg_controllen = std::mem::size_of::<ControlBuffer>() as _;
            let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, RECV_FLAGS);
            if n >= 0 {
                let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_SOCKET
                        && (*cmsg).cmsg_type == libc::SCM_RIGHTS
                    {
                        let data = libc::CMSG_DATA(cmsg);
                        let count = ((*cmsg).cmsg_len as usize - (data as usize - cmsg as usize))
                            / std::mem::size_of::<RawFd>();
                        for i in 0..count {
                            let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                            fds.push(OwnedFd::from_raw_fd(fd));
                        }
                    }
                    cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
                }
            }
            n
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_travel_with_the_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut r, w) = std::io::pipe().unwrap();
        send_with_fds(&a, b"hello\n", &[w.as_raw_fd()]).unwrap();
        drop(w);
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        let n = recv_with_fds(&b, &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"hello\n");
        assert_eq!(fds.len(), 1);
        let mut received = std::fs::File::from(fds.pop().unwrap());
        received.write_all(b"through").unwrap();
        drop(received);
        let mut text = String::new();
        r.read_to_string(&mut text).unwrap();
        assert_eq!(text, "through");
    }
}
