//! The web page (`<binary> ui`) in a real headless Chromium, on real runs of the
//! `ui_fixture` pipelines.

#[path = "support/browser.rs"]
mod browser;

use browser::{Chromium, Fixture, click, eval, open_run_page, screenshot, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_list_failed_run_script_line_and_log_filter() {
    let fixture = Fixture::new();
    assert_eq!(fixture.execute("greet", "greet-run-1"), 0, "greet succeeds");
    assert_eq!(
        fixture.execute("fragile", "fragile-run-1"),
        1,
        "fragile fails"
    );
    let ui = fixture.ui();
    let chromium = Chromium::launch().await;

    // The runs list shows both, newest first.
    let page = chromium.open(&format!("{}/", ui.url)).await;
    let rows = wait_for(
        &page,
        "both runs in the list",
        "(() => { const r = [...document.querySelectorAll('#runs-rows tr.run')].map(tr => tr.dataset.runId + ' ' + tr.querySelector('.badge').textContent); return r.length === 2 ? r : null; })()",
    )
    .await;
    assert_eq!(
        rows,
        serde_json::json!(["fragile-run-1 FAILURE", "greet-run-1 SUCCESS"])
    );
    screenshot(&page, "runs").await;
    // Filtering by status keeps only the failed run.
    page.goto(format!("{}/?status=FAILURE", ui.url))
        .await
        .unwrap();
    let filtered = wait_for(
        &page,
        "filtered list",
        "[...document.querySelectorAll('#runs-rows tr.run')].map(tr => tr.dataset.runId)",
    )
    .await;
    assert_eq!(filtered, serde_json::json!(["fragile-run-1"]));

    // The failed run: its failed step is red in the DAG, the skipped one is skipped.
    page.goto(format!("{}/runs/fragile-run-1", ui.url))
        .await
        .unwrap();
    wait_for(
        &page,
        "failed step in the DAG",
        "document.querySelector('svg.dag g.step.failed[data-step=\"load_source.compute\"]')",
    )
    .await;
    wait_for(
        &page,
        "skipped step in the DAG",
        "document.querySelector('svg.dag g.step.skipped[data-step=\"combine.compute\"]')",
    )
    .await;
    wait_for(
        &page,
        "the log filled from the stream",
        "document.querySelectorAll('#log-rows tr').length > 5",
    )
    .await;
    // Clicking the step filters the log to it and shows its error with the cause.
    click(
        &page,
        "svg.dag g.step[data-step=\"load_source.compute\"] rect",
    )
    .await;
    let error = wait_for(&page, "the step's error", "(() => { const e = document.querySelector('#step-detail .error'); return e ? e.textContent : null; })()").await;
    let error = error.as_str().unwrap();
    assert!(error.contains("the source is unavailable"), "{error}");
    assert!(
        error.contains("caused by: connection refused by 127.0.0.1:9"),
        "{error}"
    );
    let steps = wait_for(
        &page,
        "the log filtered to the step",
        "(() => { const s = [...document.querySelectorAll('#log-rows tr td:nth-child(3)')].map(td => td.textContent); return s.length > 0 && document.getElementById('log-step').value === 'load_source.compute' ? [...new Set(s)] : null; })()",
    )
    .await;
    assert_eq!(
        steps,
        serde_json::json!(["load_source"]),
        "only that step's lines remain"
    );
    screenshot(&page, "failed-run").await;

    // A log line with markup is shown as text and never runs.
    page.goto(format!("{}/runs/greet-run-1", ui.url))
        .await
        .unwrap();
    let line = wait_for(
        &page,
        "the <script> log line",
        "(() => { const td = [...document.querySelectorAll('#log-rows td')].find(td => td.textContent.includes('window.__xss')); return td ? td.textContent : null; })()",
    )
    .await;
    assert_eq!(line, "<script>window.__xss = 1</script> is only text");
    assert_eq!(eval(&page, "typeof window.__xss").await, "undefined");
    assert_eq!(
        eval(
            &page,
            "document.querySelectorAll('main script:not([type])').length"
        )
        .await,
        0
    );
    // The retried step has two bars in the timeline; the materialization is in its detail.
    wait_for(
        &page,
        "two bars for warm_up",
        "document.querySelectorAll('#gantt g.bar[data-step=\"warm_up.compute\"]').length === 2",
    )
    .await;
    wait_for(
        &page,
        "a retried bar",
        "document.querySelector('#gantt g.bar.up_for_retry[data-step=\"warm_up.compute\"]')",
    )
    .await;
    click(
        &page,
        "svg.dag g.step[data-step=\"summarize.compute\"] rect",
    )
    .await;
    let detail = wait_for(&page, "materialization", "(() => { const m = document.querySelector('#step-detail .materialization'); return m ? m.textContent : null; })()").await;
    assert!(detail.as_str().unwrap().contains("summary"), "{detail}");
    // The text filter.
    click(&page, "#log-clear").await;
    page.find_element("#log-text")
        .await
        .unwrap()
        .click()
        .await
        .unwrap()
        .type_str("cold start")
        .await
        .unwrap();
    wait_for(&page, "text filter", "(() => { const r = [...document.querySelectorAll('#log-rows tr')]; return r.length > 0 && r.every(tr => tr.textContent.includes('cold start')); })()").await;
    screenshot(&page, "run").await;

    // Resuming the event stream after event 3 gives 4, 5, ... exactly once.
    let ids = eval(
        &page,
        "fetch('/runs/greet-run-1/events', { headers: { 'Last-Event-ID': '3' } }).then(r => r.text()).then(t => t.split('\\n').filter(l => l.startsWith('id:')).map(l => Number(l.slice(3))))",
    )
    .await;
    let ids: Vec<i64> = serde_json::from_value(ids).unwrap();
    assert!(ids.len() > 5, "{ids:?}");
    assert_eq!(
        ids,
        (4..4 + ids.len() as i64).collect::<Vec<_>>(),
        "no loss, no repetition"
    );

    // The pipelines page, a pipeline with its plan and schema, and a 404 with a way back.
    page.goto(format!("{}/pipelines/fragile", ui.url))
        .await
        .unwrap();
    wait_for(
        &page,
        "pipeline plan",
        "document.querySelectorAll('svg.dag g.step').length === 3",
    )
    .await;
    wait_for(
        &page,
        "config schema",
        "document.querySelector('pre.schema').textContent.includes('storage')",
    )
    .await;
    screenshot(&page, "pipeline").await;
    page.goto(format!("{}/runs/no-such-run", ui.url))
        .await
        .unwrap();
    wait_for(&page, "404 page", "document.querySelector('h1').textContent === 'Run not found' && document.querySelector('a[href=\"/\"]')").await;
    // (The 404 status itself is reported by Chromium's log; keep only other errors.)
    let errors: Vec<String> = chromium
        .errors()
        .into_iter()
        .filter(|e| !e.contains("404"))
        .collect();
    assert!(errors.is_empty(), "JavaScript/browser errors: {errors:#?}");
    chromium.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_started_while_the_page_is_open_grows_live() {
    let fixture = Fixture::new();
    let ui = fixture.ui();
    let chromium = Chromium::launch().await;
    let page = chromium.open(&format!("{}/", ui.url)).await;
    wait_for(
        &page,
        "empty list",
        "document.querySelector('#runs-rows td.empty')",
    )
    .await;

    let mut run = fixture.spawn_execute("live", "live-run-1");
    // The runs list picks the new run up by itself.
    wait_for(
        &page,
        "the new run in the list",
        "document.querySelector('#runs-rows tr.run.started[data-run-id=\"live-run-1\"]')",
    )
    .await;
    page.goto(format!("{}/runs/live-run-1", ui.url))
        .await
        .unwrap();
    wait_for(
        &page,
        "first step running",
        "document.querySelector('svg.dag g.step.running[data-step=\"first_half.compute\"]')",
    )
    .await;
    wait_for(&page, "first log line", "[...document.querySelectorAll('#log-rows td')].some(td => td.textContent === 'first half waiting for go')").await;
    wait_for(
        &page,
        "one bar",
        "document.querySelectorAll('#gantt g.bar').length === 1",
    )
    .await;
    let rows_before = eval(&page, "document.querySelectorAll('#log-rows tr').length").await;
    // The running step's detail: its attempt, where it runs, no outputs yet.
    click(
        &page,
        "svg.dag g.step[data-step=\"first_half.compute\"] rect",
    )
    .await;
    let attempt = wait_for(&page, "the running step's detail", "(() => { const p = document.querySelector('#step-detail .step-panel[data-step=\"first_half.compute\"]'); const tr = p && p.querySelector('table.attempts tbody tr'); return p && p.querySelector('.badge.running') && tr ? [...tr.children].map(td => td.textContent) : null; })()").await;
    let attempt: Vec<String> = serde_json::from_value(attempt).unwrap();
    assert_eq!(attempt[0], "1", "{attempt:?}");
    assert_eq!(attempt[2], "running", "{attempt:?}");
    assert!(
        attempt[6].parse::<u32>().is_ok_and(|pid| pid > 0),
        "{attempt:?}"
    );
    assert_eq!(
        eval(
            &page,
            "document.querySelector('#step-detail table.values') === null"
        )
        .await,
        true,
        "no outputs before the step ends"
    );
    screenshot(&page, "live-run").await;
    let rows_before = rows_before.as_u64().min(
        eval(&page, "document.querySelectorAll('#log-rows tr').length")
            .await
            .as_u64(),
    );

    fixture.touch("go");
    // The open detail follows the step: succeeded, with its output where it is stored.
    let output = wait_for(&page, "the detail updated live", "(() => { const p = document.querySelector('#step-detail .step-panel[data-step=\"first_half.compute\"]'); const tr = p && p.querySelector('.badge.succeeded') && p.querySelector('table.values tbody tr'); return tr ? [...tr.children].map(td => td.textContent) : null; })()").await;
    let output: Vec<String> = serde_json::from_value(output).unwrap();
    assert_eq!(output[0], "result", "{output:?}");
    assert!(
        output[2].contains("live-run-1"),
        "stored under the run: {output:?}"
    );
    click(&page, "#log-clear").await;
    wait_for(&page, "second log line", "[...document.querySelectorAll('#log-rows td')].some(td => td.textContent === 'second half waiting for go2')").await;
    wait_for(&page, "two bars", "document.querySelectorAll('#gantt g.bar').length === 2 && document.querySelector('#gantt g.bar.succeeded[data-step=\"first_half.compute\"]')").await;
    wait_for(
        &page,
        "first step succeeded",
        "document.querySelector('svg.dag g.step.succeeded[data-step=\"first_half.compute\"]')",
    )
    .await;
    let rows_after = eval(&page, "document.querySelectorAll('#log-rows tr').length").await;
    assert!(
        rows_after.as_u64() > rows_before,
        "{rows_before:?} -> {rows_after}"
    );

    fixture.touch("go2");
    wait_for(
        &page,
        "run succeeded",
        "document.querySelector('#run-status .badge.success')",
    )
    .await;
    wait_for(
        &page,
        "second step succeeded",
        "document.querySelector('svg.dag g.step.succeeded[data-step=\"second_half.compute\"]')",
    )
    .await;
    // Every line arrived once.
    let ids = eval(
        &page,
        "[...document.querySelectorAll('#log-rows tr')].map(tr => Number(tr.dataset.id))",
    )
    .await;
    let ids: Vec<i64> = serde_json::from_value(ids).unwrap();
    let mut sorted = ids.clone();
    sorted.dedup();
    assert_eq!(ids, sorted, "no line repeated");
    assert!(run.wait().unwrap().success());
    chromium.assert_no_errors();
    chromium.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_interrupts_a_running_run() {
    let fixture = Fixture::new();
    let ui = fixture.ui();
    let mut run = fixture.spawn_execute_with("live", "doomed-run", "mp.yaml");
    let chromium = Chromium::launch().await;
    let page = open_run_page(&chromium, &ui.url, "doomed-run").await;
    wait_for(&page, "the step running", "[...document.querySelectorAll('#log-rows td')].some(td => td.textContent === 'first half waiting for go')").await;
    click(&page, "form[action$=\"/terminate\"] button").await;
    wait_for(
        &page,
        "the run canceled",
        "document.querySelector('#run-status .badge.canceled')",
    )
    .await;
    wait_for(&page, "the notice", "(() => { const n = document.querySelector('.notice'); return n && n.textContent.includes('interrupt'); })()").await;
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(130), "the run exits as interrupted");
    chromium.assert_no_errors();
    chromium.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_of_thousands_of_lines_stays_small_filters_all_and_survives_a_restart() {
    let fixture = Fixture::new();
    let ui = fixture.ui();
    let port = ui.port();
    let mut run = fixture.spawn_execute("chatty", "chatty-run");
    let chromium = Chromium::launch().await;
    let page = open_run_page(&chromium, &ui.url, "chatty-run").await;
    // The first 3,000 lines arrive; the log follows the newest one and keeps few rows.
    wait_for(&page, "the first half of the lines", "[...document.querySelectorAll('#log-rows td')].some(td => td.textContent === 'talk waiting for go')").await;
    let rows = eval(&page, "document.querySelectorAll('#log-rows tr').length").await;
    assert!(
        rows.as_u64().is_some_and(|n| (1..200).contains(&n)),
        "only the visible rows are drawn: {rows}"
    );

    // The server goes away and comes back on the same port while the run goes on: the
    // page reconnects and resumes after the last line it has.
    drop(ui);
    fixture.touch("go");
    let ui = fixture.ui_on(port);
    wait_for(
        &page,
        "the run's end after the reconnect",
        "document.querySelector('#run-status .badge.success')",
    )
    .await;
    assert!(run.wait().unwrap().success());
    let served = eval(
        &page,
        "fetch('/runs/chatty-run/events').then(r => r.text()).then(t => t.split('\\n').filter(l => l.startsWith('id:')).map(l => Number(l.slice(3))))",
    )
    .await;
    let served: Vec<i64> = serde_json::from_value(served).unwrap();
    assert!(served.len() > 6_000, "{} events", served.len());
    let total = served.len();
    let info = wait_for(&page, "every event in the log", &format!("(() => {{ const t = document.getElementById('log-info').textContent; return t.startsWith('{total} of {total} ') ? t : null; }})()")).await;
    assert_eq!(info, format!("{total} of {total} events match"));
    let shown_ids = eval(
        &page,
        "[...document.querySelectorAll('#log-rows tr')].map(tr => Number(tr.dataset.id))",
    )
    .await;
    let shown_ids: Vec<i64> = serde_json::from_value(shown_ids).unwrap();
    assert_eq!(
        shown_ids,
        served[served.len() - shown_ids.len()..].to_vec(),
        "the newest lines, each once, in order"
    );
    screenshot(&page, "long-log").await;

    // Scrolled to the top, the first events are drawn instead.
    eval(&page, "document.getElementById('log-scroll').scrollTop = 0").await;
    let top = wait_for(&page, "the top of the log", "(() => { const ids = [...document.querySelectorAll('#log-rows tr')].map(tr => Number(tr.dataset.id)); return ids.length && [...document.querySelectorAll('#log-rows td')].some(td => td.textContent === 'chatter line 1') ? ids : null; })()").await;
    let top: Vec<i64> = serde_json::from_value(top).unwrap();
    assert_eq!(
        top,
        served[..top.len()].to_vec(),
        "the oldest lines, in order"
    );

    // Filters look at every line, not only the drawn ones.
    page.find_element("#log-text")
        .await
        .unwrap()
        .click()
        .await
        .unwrap()
        .type_str("chatter line 2999")
        .await
        .unwrap();
    let found = wait_for(&page, "a line from the middle", "(() => { const r = [...document.querySelectorAll('#log-rows tr')]; return document.getElementById('log-info').textContent.startsWith('1 of ') && r.length === 1 ? r[0].children[4].textContent : null; })()").await;
    assert_eq!(found, "chatter line 2999");
    click(&page, "#log-clear").await;
    eval(&page, "(() => { const l = document.getElementById('log-level'); l.value = 'WARNING'; l.dispatchEvent(new Event('change')); return true; })()").await;
    let warnings = wait_for(&page, "only warnings", "(() => { const t = document.getElementById('log-info').textContent; const r = [...document.querySelectorAll('#log-rows tr')]; return r.length && r.every(tr => tr.classList.contains('lvl-warning')) ? Number(t.split(' ')[0]) : null; })()").await;
    assert_eq!(warnings, 600, "every tenth of 6,000 lines is a warning");
    click(&page, "#log-clear").await;
    click(&page, "svg.dag g.step[data-step=\"listen.compute\"] rect").await;
    let steps = wait_for(&page, "the log filtered to listen", "(() => { const s = [...document.querySelectorAll('#log-rows tr td:nth-child(3)')].map(td => td.textContent); return s.length && document.getElementById('log-step').value === 'listen.compute' ? [...new Set(s)] : null; })()").await;
    assert_eq!(steps, serde_json::json!(["listen"]));
    wait_for(
        &page,
        "listen's detail",
        "document.querySelector('#step-detail .step-panel[data-step=\"listen.compute\"] .badge.succeeded')",
    )
    .await;

    // The dropped connection is the only thing the browser may complain about.
    let errors: Vec<String> = chromium
        .errors()
        .into_iter()
        .filter(|e| !e.contains("/runs/chatty-run/events"))
        .collect();
    assert!(errors.is_empty(), "JavaScript/browser errors: {errors:#?}");
    drop(ui);
    chromium.close().await;
}
