//! The Redis data model (DESIGN §5), in one place: key names ([`keys`]), the layout of a
//! live-tail entry ([`fix`]), the compressed history chunk codec ([`chunk`]), the rows
//! both decode to ([`row`]) and the Lua scripts that change them atomically
//! ([`scripts`], one typed call each); payloads at rest are sealed by [`vault`]. Nothing outside this module writes a `tg:` key
//! literal or a line of Lua.

pub mod chunk;
pub mod fix;
pub mod hist;
pub mod keys;
pub mod row;
pub mod scripts;
pub mod tail;
pub mod vault;

pub use fix::*;
pub use keys::*;
