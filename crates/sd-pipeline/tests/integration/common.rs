//! What the modules of this test binary share.

/// burn's backend RNG is global to the process, and model and adapter initialisation (and
/// adapter dropout) draw from it after the run seeds it: every test that builds a model
/// or trains holds this lock, so tests on other threads cannot draw between a seed and
/// the draws it fixes (runs compared bit for bit would otherwise differ).
pub fn seeded() -> std::sync::MutexGuard<'static, ()> {
    static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SEEDED.lock().unwrap_or_else(|e| e.into_inner())
}
