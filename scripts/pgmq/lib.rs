// Empty: this package exists so that `cargo fetch --locked` brings pgmq's SQL from crates.io.
