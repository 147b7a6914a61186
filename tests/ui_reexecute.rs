//! Re-executing a run from the web page, in a real headless Chromium: the page starts
//! this binary's own `reexecute` (the CLI's code) and moves to the child run.

#[path = "support/browser.rs"]
mod browser;

use browser::{Chromium, Fixture, screenshot, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reexecute_from_failure_creates_a_child_run_that_succeeds() {
    let fixture = Fixture::new();
    assert_eq!(fixture.execute("fragile", "fragile-parent"), 1);
    let ui = fixture.ui();
    let chromium = Chromium::launch().await;
    let page = chromium
        .open(&format!("{}/runs/fragile-parent", ui.url))
        .await;
    wait_for(
        &page,
        "failed run page",
        "document.querySelector('svg.dag g.step.failed')",
    )
    .await;
    // Fix the source, then re-execute from the failure.
    fixture.touch("fixed");
    page.find_element("button[name=strategy][value=from_failure]")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // Either the child run's page, or the page saying why the re-execution did not start.
    let outcome = wait_for(
        &page,
        "the child run's page",
        "(() => { const r = document.getElementById('run'); if (r && r.dataset.runId !== 'fragile-parent') return { child: r.dataset.runId }; const m = document.querySelector('section.message'); return m ? { refused: m.textContent } : null; })()",
    )
    .await;
    assert!(
        outcome.get("refused").is_none(),
        "the page's re-execute action needs this binary's `reexecute` command (the CLI's re-execution): {}",
        outcome["refused"]
    );
    let child = outcome["child"].clone();
    wait_for(
        &page,
        "the child succeeded",
        "document.querySelector('#run-status .badge.success')",
    )
    .await;
    wait_for(
        &page,
        "a link to the parent",
        "document.querySelector('.run-header a[href=\"/runs/fragile-parent\"]')",
    )
    .await;
    wait_for(
        &page,
        "combine ran",
        "document.querySelector('svg.dag g.step.succeeded[data-step=\"combine.compute\"]')",
    )
    .await;
    screenshot(&page, "reexecuted-run").await;
    // The parent now links to its child.
    page.goto(format!("{}/runs/fragile-parent", ui.url))
        .await
        .unwrap();
    let link = format!(
        "document.querySelector('.run-header a[href=\"/runs/{}\"]')",
        child.as_str().unwrap()
    );
    wait_for(&page, "a link to the child", &link).await;
    chromium.assert_no_errors();
    chromium.close().await;
}
