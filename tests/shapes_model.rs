//! The built-in model (`models/shapes-sd`, trained by
//! `tools/train_shapes_model.py`) draws what its prompt says.
//!
//! `tests/data/shapes-eval.json` holds 200 single-object captions whose
//! scenes were never rendered in training, each with the ground truth the
//! renderer knows (background colour, object colour, shape, position). The
//! built-in model runs them through the Rust pipeline at its defaults (native
//! size, steps, guidance, sampler), and a judge reads the attributes back
//! from the pixels: the background from the border, the object as the largest
//! blob that differs from it (its colour, the centre of its bounding box, and
//! how much of that box it fills: square, circle, triangle). The judge is the
//! one of `tools/shapes_data.py`, with the thresholds the JSON carries.
//!
//! * `builtin_model_draws_its_prompts` (fast, in `cargo test`): the first 10
//!   captions in one batch; background, object colour, position and shape
//!   must be right (the random-weight model fails it).
//! * `builtin_model_full_evaluation` (ignored; the documented command):
//!   all 200, prints the table and checks the targets:
//!   `cargo test --release --test shapes_model -- --ignored --nocapture`

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use raftgen::executor::diffusion::model_info;
use raftgen::models::catalog::{self, ModelEntry};
use raftgen::models::{GenRequest, Pipeline, SamplerKind};
use serde::Deserialize;

#[derive(Deserialize)]
struct EvalSet {
    side: usize,
    colours: BTreeMap<String, [f64; 3]>,
    anchors: BTreeMap<String, [f64; 2]>,
    mask_distance: f64,
    square_fill: f64,
    triangle_fill: f64,
    min_pixels: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize, Clone)]
struct Case {
    prompt: String,
    seed: u64,
    background: String,
    colour: String,
    shape: String,
    position: String,
}

#[derive(Debug, Default, PartialEq)]
struct Judged {
    background: String,
    colour: Option<String>,
    position: Option<String>,
    shape: Option<String>,
}

fn eval_set() -> EvalSet {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/shapes-eval.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

impl EvalSet {
    fn nearest_colour(&self, rgb: [f64; 3]) -> String {
        let d = |c: &[f64; 3]| (0..3).map(|i| (rgb[i] - c[i]).powi(2)).sum::<f64>();
        self.colours.iter().min_by(|a, b| d(a.1).total_cmp(&d(b.1))).map(|(k, _)| k.clone()).unwrap()
    }

    /// Reads the scene back from RGB bytes (`side` x `side`), as
    /// `shapes_data.judge` does.
    fn judge(&self, rgb: &[u8]) -> Judged {
        let n = self.side;
        let px = |x: usize, y: usize| -> [f64; 3] {
            let i = (y * n + x) * 3;
            [rgb[i] as f64, rgb[i + 1] as f64, rgb[i + 2] as f64]
        };
        let mut border = Vec::new();
        for i in 0..n {
            border.extend([px(i, 0), px(i, n - 1)]);
        }
        for i in 0..n {
            border.extend([px(0, i), px(n - 1, i)]);
        }
        let bg = median(&border);
        let mut out = Judged { background: self.nearest_colour(bg), ..Judged::default() };
        let mask: Vec<bool> = (0..n * n)
            .map(|i| {
                let p = px(i % n, i / n);
                (0..3).map(|c| (p[c] - bg[c]).powi(2)).sum::<f64>().sqrt() > self.mask_distance
            })
            .collect();
        let blob = largest_component(&mask, n);
        if blob.len() < self.min_pixels {
            return out;
        }
        let pixels: Vec<[f64; 3]> = blob.iter().map(|&i| px(i % n, i / n)).collect();
        out.colour = Some(self.nearest_colour(median(&pixels)));
        let (x0, x1) = (blob.iter().map(|i| i % n).min().unwrap(), blob.iter().map(|i| i % n).max().unwrap() + 1);
        let (y0, y1) = (blob.iter().map(|i| i / n).min().unwrap(), blob.iter().map(|i| i / n).max().unwrap() + 1);
        let (cx, cy) = ((x0 + x1) as f64 / 2.0, (y0 + y1) as f64 / 2.0);
        let d = |a: &[f64; 2]| (a[0] - cx).powi(2) + (a[1] - cy).powi(2);
        out.position = self.anchors.iter().min_by(|a, b| d(a.1).total_cmp(&d(b.1))).map(|(k, _)| k.clone());
        let fill = blob.len() as f64 / ((x1 - x0) * (y1 - y0)) as f64;
        let shape = if fill > self.square_fill {
            "square"
        } else if fill > self.triangle_fill {
            "circle"
        } else {
            "triangle"
        };
        out.shape = Some(shape.to_string());
        out
    }
}

/// Per-channel median (numpy's: the mean of the middle two of an even count).
fn median(v: &[[f64; 3]]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let mut ch: Vec<f64> = v.iter().map(|p| p[c]).collect();
        ch.sort_by(f64::total_cmp);
        let m = ch.len() / 2;
        *o = if ch.len().is_multiple_of(2) { (ch[m - 1] + ch[m]) / 2.0 } else { ch[m] };
    }
    out
}

/// The largest 4-connected component of `mask` (n x n), as pixel indices;
/// the first found in scan order wins a tie.
fn largest_component(mask: &[bool], n: usize) -> Vec<usize> {
    let mut seen = vec![false; mask.len()];
    let mut best = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        let (mut stack, mut blob) = (vec![start], Vec::new());
        while let Some(i) = stack.pop() {
            blob.push(i);
            let (x, y) = (i % n, i / n);
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < n {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - n);
            }
            if y + 1 < n {
                visit(i + n);
            }
        }
        if blob.len() > best.len() {
            best = blob;
        }
    }
    best
}

/// Right answers per attribute, out of the cases run.
#[derive(Default)]
struct Tally {
    n: usize,
    background: usize,
    colour: usize,
    position: usize,
    shape: usize,
}

impl Tally {
    fn add(&mut self, case: &Case, j: &Judged) {
        self.n += 1;
        self.background += (j.background == case.background) as usize;
        self.colour += (j.colour.as_deref() == Some(&case.colour)) as usize;
        self.position += (j.position.as_deref() == Some(&case.position)) as usize;
        self.shape += (j.shape.as_deref() == Some(&case.shape)) as usize;
    }

    fn pct(&self, right: usize) -> f64 {
        100.0 * right as f64 / self.n as f64
    }

    fn table(&self, targets: [f64; 4]) -> String {
        let mut s = format!("| attribute | right of {} | target |\n| --- | --- | --- |\n", self.n);
        for ((name, right), t) in [
            ("background colour", self.background),
            ("object colour", self.colour),
            ("position", self.position),
            ("shape", self.shape),
        ]
        .into_iter()
        .zip(targets)
        {
            let target = if t > 0.0 { format!(">= {t:.0}%") } else { "not checked".to_string() };
            s += &format!("| {name} | {:.1}% ({right}) | {target} |\n", self.pct(right));
        }
        s
    }

    fn meets(&self, targets: [f64; 4]) -> bool {
        [self.background, self.colour, self.position, self.shape].iter().zip(targets).all(|(&r, t)| self.pct(r) >= t)
    }
}

/// Runs `cases` through the model at its defaults, `batch` prompts a call.
fn run(entry: &ModelEntry, set: &EvalSet, cases: &[Case], batch: usize) -> Tally {
    let info = model_info(entry);
    let side = info.default_side_px;
    assert_eq!(side as usize, set.side, "the evaluation is made for the model's native size");
    let sampler = SamplerKind::parse(&info.default_sampler).unwrap();
    let pipe = Pipeline::load(entry.family, &entry.files, &Device::Cpu, DType::F32).unwrap();
    let mut tally = Tally::default();
    let t = std::time::Instant::now();
    for chunk in cases.chunks(batch) {
        let reqs: Vec<GenRequest> = chunk
            .iter()
            .map(|c| GenRequest {
                prompt: c.prompt.clone(),
                negative_prompt: String::new(),
                width: side,
                height: side,
                steps: info.default_steps as usize,
                guidance: info.default_guidance_centi as f64 / 100.0,
                seed: c.seed,
                sampler,
            })
            .collect();
        let out = pipe.generate(&reqs, &mut |_, _| true).unwrap();
        for (c, o) in chunk.iter().zip(&out) {
            let j = set.judge(&o.rgb);
            if std::env::var_os("SHAPES_EVAL_VERBOSE").is_some() {
                println!("{:?} <- {:?}", j, c.prompt);
            }
            tally.add(c, &j);
        }
    }
    println!(
        "{} captions, {} steps, guidance {}, {side}x{side}: {:.2} s per image",
        cases.len(),
        info.default_steps,
        info.default_guidance_centi as f64 / 100.0,
        t.elapsed().as_secs_f64() / cases.len() as f64
    );
    tally
}

const TARGETS: [f64; 4] = [95.0, 90.0, 85.0, 80.0];

#[test]
fn builtin_model_draws_its_prompts() {
    let set = eval_set();
    let entry = catalog::builtin().unwrap();
    let cases = &set.cases[..10];
    let tally = run(&entry, &set, cases, 10);
    // Ten captions, every attribute asserted (the random-weight tiny-sd gets
    // 2, 2 and 4 of 10 on background, object colour and shape; the shipped
    // model 10, 10 and 8, and 10 of 10 on position). A pipeline that loses
    // the prompt on its way to the UNet, or swaps the guidance, fails here.
    let targets = [90.0, 80.0, 80.0, 60.0];
    println!("{}", tally.table(targets));
    assert!(tally.meets(targets), "the built-in model does not draw what its prompts say:\n{}", tally.table(targets));
}

#[test]
#[ignore = "the full evaluation (200 captions, a few minutes in release): see the module doc"]
fn builtin_model_full_evaluation() {
    let set = eval_set();
    let entry = catalog::builtin().unwrap();
    single_image_time(&entry, &set.cases[0]);
    let tally = run(&entry, &set, &set.cases, 20);
    println!("{}", tally.table(TARGETS));
    assert!(tally.meets(TARGETS), "below the targets");
}

/// Prints the time of one image alone (batch of one) at the model's
/// defaults: the median of 5 runs after a warm-up.
fn single_image_time(entry: &ModelEntry, case: &Case) {
    let info = model_info(entry);
    let pipe = Pipeline::load(entry.family, &entry.files, &Device::Cpu, DType::F32).unwrap();
    let req = GenRequest {
        prompt: case.prompt.clone(),
        negative_prompt: String::new(),
        width: info.default_side_px,
        height: info.default_side_px,
        steps: info.default_steps as usize,
        guidance: info.default_guidance_centi as f64 / 100.0,
        seed: case.seed,
        sampler: SamplerKind::parse(&info.default_sampler).unwrap(),
    };
    pipe.generate(std::slice::from_ref(&req), &mut |_, _| true).unwrap();
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            pipe.generate(std::slice::from_ref(&req), &mut |_, _| true).unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "one image, {}x{} px, {} steps, guidance {}: median {:.3} s of 5 (min {:.3}, max {:.3})",
        req.width, req.height, req.steps, req.guidance, times[2], times[0], times[4]
    );
}

/// The judge itself, on shapes drawn here: it reads them right, and calls an
/// empty image "no object".
#[test]
fn judge_reads_drawn_shapes() {
    let set = eval_set();
    let n = set.side;
    let colour = |name: &str| set.colours[name].map(|v| v as u8);
    let draw = |bg: &str, fg: &str, shape: &str, (cx, cy): (f64, f64), r: f64| -> Vec<u8> {
        let mut img = Vec::with_capacity(n * n * 3);
        for y in 0..n {
            for x in 0..n {
                let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                let inside = match shape {
                    "circle" => dx * dx + dy * dy <= r * r,
                    "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
                    // Apex up at cy - r, base at cy + r, half-width r at the base.
                    _ => dy >= -r && dy <= r && dx.abs() <= (dy + r) / 2.0,
                };
                img.extend(colour(if inside { fg } else { bg }));
            }
        }
        img
    };
    for (bg, fg, shape, pos, r) in [
        ("blue", "red", "circle", "left", 7.0),
        ("white", "black", "square", "top", 10.0),
        ("black", "yellow", "triangle", "right", 13.0),
        ("green", "purple", "circle", "center", 13.0),
        ("orange", "white", "triangle", "bottom", 7.0),
    ] {
        let [ax, ay] = set.anchors[pos];
        let img = draw(bg, fg, shape, (ax, ay), r);
        let want = Judged {
            background: bg.into(),
            colour: Some(fg.into()),
            position: Some(pos.into()),
            shape: Some(shape.into()),
        };
        assert_eq!(set.judge(&img), want, "{fg} {shape} {pos} on {bg}");
    }
    let blank = draw("red", "red", "circle", (32.0, 32.0), 10.0);
    assert_eq!(set.judge(&blank), Judged { background: "red".into(), ..Judged::default() });
}
