//! The native core of the `vfio-user` Node package: plain Rust, no N-API.
//!
//! It knows just enough of the wire to frame messages (the 16-byte header and
//! its `msg_size`), carries SCM_RIGHTS fds in both directions, and wraps the
//! few kernel objects the protocol hands around: eventfds, memfds and mmaps,
//! with SIGBUS-safe copies and dirty-page bitmaps for guest memory,
//! asynchronous block I/O between files and that memory, and TAP interfaces
//! for virtual NICs.
//! Protocol semantics live in the TypeScript layer above, except DMA_MAP and
//! DMA_UNMAP, which the window table (`dma`) answers on the connection's own
//! thread without a hop into JS.

pub mod block;
pub mod deadline;
pub mod dma;
pub mod dirty;
pub mod doorbells;
pub mod eventfd;
pub mod framing;
pub mod memfd;
pub mod mmap;
pub mod safe_copy;
pub mod socket;
pub mod sparse;
pub mod tap;
pub mod timerfd;

pub use framing::{Frame, FrameConnection, FramingError, ReadOutcome, HEADER_SIZE};
pub use dirty::{DirtyBitmap, DIRTY_PAGE_SIZE};
pub use mmap::{Mapping, MappingError, Protection};
