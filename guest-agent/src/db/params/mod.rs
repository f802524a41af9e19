//! Database parameters: the allow-list per engine and flavour, validation of a requested
//! change set, the override include file the agent writes (and reads back), live values
//! as the server reports them, and creation templates.
//!
//! **Invariant:** only this module knows which server parameters a control plane may
//! change, their types, their safe ranges and whether a change needs a restart. A change
//! set is checked as a whole: every problem is reported at once, and nothing is applied
//! unless all of it is valid.
//!
//! Units. Sizes are normalised to bytes and durations to milliseconds.
//! - A size given as a JSON number is bytes. As a string it carries a unit: PostgreSQL's
//!   `B`, `kB`, `MB`, `GB`, `TB` (1024-based, case matters, as in `postgresql.conf`) for
//!   PostgreSQL; MySQL's `K`, `M`, `G`, `T` suffixes (or none: bytes) for MySQL and
//!   MariaDB. `"0"` needs no unit. A PostgreSQL size string without a unit is refused,
//!   because the server would read it in the parameter's own unit (8 kB pages for
//!   `shared_buffers`) while a JSON number here means bytes.
//! - A duration given as a number, or as a string without a unit, is in the parameter's
//!   base unit ([`TimeUnit`], named in each parameter's help). A string may carry `ms`,
//!   `s`, `min`, `h` or `d`, for either engine.
//!
//! A value the server would silently round (not a whole number of its base unit) is
//! refused rather than rounded, so what the agent writes is what the server runs and a
//! wanted value compares equal to the live one. `null` for a parameter removes the
//! override (the server default applies again).
//!
//! Where things are:
//! - `spec`: what describes a parameter ([`Engine`], [`Flavour`], [`Kind`], [`ParamSpec`]);
//! - `catalog`: the allow-list itself, one table per engine ([`lookup`], [`allow_list`]);
//! - `value`: the normalised [`Value`] and how people read it;
//! - `units`: sizes and durations in each server's syntax, read and written exactly;
//! - `validate`: a control plane's change set checked against the catalog ([`validate()`]);
//! - `server`: values as a live server reports them ([`sql_show_value`],
//!   [`pg_settings_to_value`]);
//! - `overrides`: the include file the agent writes and reads back ([`render_postgres`],
//!   [`render_mysql`], [`parse_rendered_postgres`], [`parse_rendered_mysql`]);
//! - `template`: reusable creation parameters ([`Template`]).

mod catalog;
mod overrides;
mod server;
mod spec;
mod template;
mod units;
mod validate;
mod value;

#[cfg(test)]
mod test_support;

pub use catalog::{allow_list, lookup};
pub use overrides::{
    parse_rendered_mysql, parse_rendered_postgres, render_mysql, render_postgres,
    OverridesParseError,
};
pub use server::{pg_settings_to_value, sql_show_value};
pub use spec::{Engine, Flavour, Kind, ParamSpec, TimeUnit};
pub use template::{Template, TEMPLATE_FORMAT};
pub use validate::{validate, ParamErrors, ParamProblem, ProblemKind, Validated};
pub use value::Value;

// Message helpers shared by the submodules: problems echo what was sent, cut short.

/// `text` in double quotes with escapes, cut short if long (messages echo what was sent).
fn quote(text: &str) -> String {
    format!("{:?}", shorten(text, 60))
}

fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        let mut short: String = text.chars().take(max_chars).collect();
        short.push('…');
        short
    }
}
