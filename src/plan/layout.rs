//! The output's tensors and where each one's inputs come from.
//!
//! A `models:` recipe writes the base's tensors in plan order, each read under its own name from
//! every model. A `slices:` recipe (mergekit's `plan.py`) writes the tensors before the layers
//! from the first slice's models, then each slice's layers renumbered from 0 up (output layer
//! `L` reads layer `start + i` of each source), then the tensors after the layers from the last
//! slice's models; config.json's layer count becomes the sum of the slices' lengths.

use super::layers::{self, layer_of, position, with_layer, Layers};
use super::{Inputs, Problem};
use crate::checkpoint::Checkpoint;
use crate::recipe::{InputRef, Recipe, Site};

/// One output tensor and its inputs.
#[derive(Clone, Debug)]
pub struct Slot {
    pub name: String,
    /// Its name in the base, None when the base is not an input.
    pub base: Option<String>,
    /// Per task: its name in that task's model, None when the task is not an input.
    pub tasks: Vec<Option<String>>,
    /// The output layer and the number of layers of its stack (None outside the layers).
    pub layer: Option<(usize, usize)>,
    /// The position for gradients (mergekit's `t`).
    pub t: f64,
    /// The output slice (`slices:` recipes).
    pub slice: Option<usize>,
}

impl Slot {
    pub fn site(&self) -> Site<'_> {
        Site {
            name: &self.name,
            t: self.t,
            slice: self.slice,
            base: self.base.as_deref(),
            inputs: &self.tasks,
        }
    }

    /// The one input of a passthrough tensor (or the first one present).
    pub fn first_input(&self) -> Option<(InputRef, &str)> {
        if let Some(b) = &self.base {
            return Some((InputRef::Base, b));
        }
        self.tasks
            .iter()
            .enumerate()
            .find_map(|(t, n)| n.as_deref().map(|n| (InputRef::Task(t), n)))
    }
}

pub struct Layout {
    pub slots: Vec<Slot>,
    /// `slices:`: per output layer, the model and layer of its slice's first source (config
    /// fields with one entry per layer follow these); the count goes into config.json.
    pub out_layers: Option<Vec<(InputRef, usize)>>,
}

pub fn checkpoint(inputs: &Inputs, i: InputRef) -> &Checkpoint {
    match i {
        InputRef::Base => &inputs.base,
        InputRef::Task(t) => &inputs.tasks[t].model,
    }
}

/// The output tensors of `recipe` over `inputs`; problems are added to `problems`.
pub fn layout(recipe: &Recipe, inputs: &Inputs, problems: &mut Vec<Problem>) -> Layout {
    if recipe.sliced() {
        return sliced(recipe, inputs, problems);
    }
    let base = &inputs.base;
    let names = || base.tensors().map(|(_, t)| t.name.as_str());
    let ls = match Layers::of(names(), base.config.as_ref()) {
        Ok(l) => l,
        Err(msg) => {
            if recipe.per_layer() {
                problems.push(Problem::in_file(
                    &config_path(base),
                    format!("{msg}: per-layer values need the true number of layers"),
                ));
            }
            Layers {
                stacks: layers::stacks(names()),
                key: None,
            }
        }
    };
    let nt = recipe.tasks.len();
    let slots = base
        .tensors()
        .map(|(_, t)| {
            let (layer, pos) = match layer_of(&t.name) {
                Some(l) => {
                    let n = ls.count(&l.stack);
                    (Some((l.index, n)), position(l.index, n))
                }
                None => (None, 0.0),
            };
            Slot {
                name: t.name.clone(),
                base: Some(t.name.clone()),
                tasks: vec![Some(t.name.clone()); nt],
                layer,
                t: pos,
                slice: None,
            }
        })
        .collect();
    Layout {
        slots,
        out_layers: None,
    }
}

fn config_path(ck: &Checkpoint) -> std::path::PathBuf {
    ck.folder
        .as_ref()
        .map(|f| f.join("config.json"))
        .unwrap_or_else(|| ck.root.clone())
}

fn sliced(recipe: &Recipe, inputs: &Inputs, problems: &mut Vec<Problem>) -> Layout {
    let nt = recipe.tasks.len();
    let mut stack_of = std::collections::HashMap::new();
    let before = problems.len();
    for s in &recipe.slices {
        for src in &s.sources {
            let ck = checkpoint(inputs, src.input);
            let ls = match Layers::of(
                ck.tensors().map(|(_, t)| t.name.as_str()),
                ck.config.as_ref(),
            ) {
                Ok(l) => l,
                Err(msg) => {
                    problems.push(Problem::in_file(&config_path(ck), msg));
                    continue;
                }
            };
            let Some((stack, count)) = ls.single() else {
                problems.push(Problem::in_file(
                    &ck.root,
                    format!(
                        "`{}`: slices need a model with one stack of layers, this one has {} \
                         ({}); mergekit needs `modules:` for that, which stamerge does not support",
                        src.field,
                        ls.stacks.len(),
                        ls.stacks.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
                continue;
            };
            if src.layers.1 > count {
                problems.push(Problem::in_file(
                    &ck.root,
                    format!(
                        "`{}.layer_range` [{}, {}] reaches past the model's {count} layers",
                        src.field, src.layers.0, src.layers.1
                    ),
                ));
            }
            stack_of.insert(src.field.clone(), stack.to_string());
        }
    }
    if problems.len() > before {
        return Layout {
            slots: vec![],
            out_layers: None,
        };
    }
    let mut slots = Vec::new();
    let empty = |slice: usize| Slot {
        name: String::new(),
        base: None,
        tasks: vec![None; nt],
        layer: None,
        t: 0.0,
        slice: Some(slice),
    };
    // Every source of the slice reads `name` of its model (tensors outside the layers).
    // The tensors outside the layers, from the slice's models: the base's names (its first
    // source's for passthrough). As in a `models:` recipe, one that no task has is the base's
    // alone (copied), and one that some tasks have and others lack is missing from those.
    let loose =
        |si: usize, keep: fn(&str) -> bool, slots: &mut Vec<Slot>, problems: &mut Vec<Problem>| {
            let s = &recipe.slices[si];
            let lead = s
                .sources
                .iter()
                .find(|src| src.input == InputRef::Base)
                .unwrap_or(&s.sources[0]);
            for (_, t) in checkpoint(inputs, lead.input).tensors() {
                if layer_of(&t.name).is_some() || !keep(&t.name) {
                    continue;
                }
                let mut slot = empty(si);
                slot.name = t.name.clone();
                let has = |src: &&crate::recipe::SourceSpec| {
                    checkpoint(inputs, src.input).get(&t.name).is_some()
                };
                let others = s.sources.iter().filter(|src| src.field != lead.field);
                let only_lead = !others.clone().any(|src| has(&src));
                for src in s
                    .sources
                    .iter()
                    .filter(|src| !only_lead || src.field == lead.field)
                {
                    add_input(&mut slot, src.input, &t.name, inputs, &src.field, problems);
                }
                slots.push(slot);
            }
        };
    loose(0, layers::before_layers, &mut slots, problems);
    let total: usize = recipe.slices.iter().map(|s| s.len()).sum();
    let mut out_layers = Vec::with_capacity(total);
    for (si, s) in recipe.slices.iter().enumerate() {
        let first = &s.sources[0];
        let ck = checkpoint(inputs, first.input);
        let stack = &stack_of[&first.field];
        for i in 0..s.len() {
            let out_index = out_layers.len();
            out_layers.push((first.input, first.layers.0 + i));
            for (_, t) in ck.tensors() {
                let Some(l) = layer_of(&t.name) else { continue };
                if l.index != first.layers.0 + i || &l.stack != stack {
                    continue;
                }
                let mut slot = empty(si);
                slot.name = with_layer(&t.name, &l, out_index);
                slot.layer = Some((out_index, total));
                slot.t = position(i, s.len());
                for src in &s.sources {
                    let name = with_layer(&t.name, &l, src.layers.0 + i);
                    add_input(&mut slot, src.input, &name, inputs, &src.field, problems);
                }
                slots.push(slot);
            }
        }
    }
    loose(
        recipe.slices.len() - 1,
        |n| !layers::before_layers(n),
        &mut slots,
        problems,
    );
    Layout {
        slots,
        out_layers: Some(out_layers),
    }
}

fn add_input(
    slot: &mut Slot,
    input: InputRef,
    name: &str,
    inputs: &Inputs,
    field: &str,
    problems: &mut Vec<Problem>,
) {
    let ck = checkpoint(inputs, input);
    if ck.get(name).is_none() {
        problems.push(Problem::in_tensor(
            &ck.root,
            name,
            format!(
                "missing tensor: `{field}` is an input of output tensor `{}`, and this model lacks it",
                slot.name
            ),
        ));
        return;
    }
    match input {
        InputRef::Base => slot.base = Some(name.to_string()),
        InputRef::Task(t) => slot.tasks[t] = Some(name.to_string()),
    }
}
