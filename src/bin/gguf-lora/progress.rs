//! The progress bars of the streaming commands (`merge`, `quantize`, `extract`): on stderr, and only when stderr
//! is a terminal, so logs and pipes stay clean. Advances by each tensor's input bytes.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use gguf_lora::gguf::GgufModel;

/// The bar on screen, if any, so that the signal handler can clear it before its last words.
static ON_SCREEN: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Clears the progress bar on screen, if there is one.
pub fn clear() {
    let bar = ON_SCREEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

pub struct TensorProgress {
    bar: Option<indicatif::ProgressBar>,
    sizes: Vec<u64>,
    done: AtomicUsize,
}

impl TensorProgress {
    pub fn new(model: &GgufModel) -> TensorProgress {
        let sizes: Vec<u64> = model.tensors().map(|(_, t)| t.n_bytes()).collect();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(sizes.iter().sum());
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {msg} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            *ON_SCREEN.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar.clone());
            bar
        });
        TensorProgress {
            bar,
            sizes,
            done: AtomicUsize::new(0),
        }
    }

    /// The engine's `on_done(index, bytes)` callback.
    pub fn on_done(&self, index: usize, _bytes: u64) {
        let k = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(bar) = &self.bar {
            bar.set_message(format!("tensors {k}/{}", self.sizes.len()));
            bar.inc(self.sizes.get(index).copied().unwrap_or(0));
        }
    }

    pub fn finish(&self) {
        if self.bar.is_some() {
            clear();
        }
    }
}

/// A bar that counts items (`extract`'s tensors), on stderr when it is a terminal.
pub struct CountProgress {
    bar: Option<indicatif::ProgressBar>,
}

impl CountProgress {
    pub fn new(what: &'static str) -> CountProgress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{bar:40}} {{pos}}/{{len}} {what} ETA {{eta}}"
                ))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            *ON_SCREEN.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar.clone());
            bar
        });
        CountProgress { bar }
    }

    pub fn set(&self, done: usize, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    }

    pub fn finish(&self) {
        if self.bar.is_some() {
            clear();
        }
    }
}
