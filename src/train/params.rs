//! The trainable parameters of a wrapped model, by module path: collected for checkpoints and
//! adapter exports, loaded back by path, and given ids derived from their paths so that an
//! optimizer record written by one process matches the parameters of the next.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::data::stable_hash;
use crate::{Error, Result};

/// A trainable tensor on the host: shape and f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

struct Collect<'a> {
    path: Vec<String>,
    /// Collect these paths; `None`: every parameter that requires a gradient.
    only: Option<&'a BTreeSet<String>>,
    out: BTreeMap<String, HostTensor>,
    error: Option<String>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let wanted = match self.only {
            Some(paths) => paths.contains(&self.path.join(".")),
            None => param.is_require_grad(),
        };
        if !wanted {
            return;
        }
        let t = param.val();
        let shape = t.dims().to_vec();
        match t.into_data().convert::<f32>().into_vec::<f32>() {
            Ok(values) => {
                self.out
                    .insert(self.path.join("."), HostTensor { shape, values });
            }
            Err(e) => {
                self.error = Some(format!("reading parameter {}: {e:?}", self.path.join(".")))
            }
        }
    }
}

/// Every parameter that requires a gradient, keyed by its module path (`blocks.3.ffn...`).
pub fn trainable<B: Backend, M: Module<B>>(module: &M) -> Result<BTreeMap<String, HostTensor>> {
    collect(module, None)
}

/// The module paths of the parameters that require a gradient. (A model converted for
/// inference with `valid()` no longer marks them: take the paths from the training model.)
pub fn trainable_paths<B: Backend, M: Module<B>>(module: &M) -> Result<BTreeSet<String>> {
    Ok(trainable(module)?.into_keys().collect())
}

/// The parameters at `paths` (on any backend, marked or not); errors if one is missing.
pub fn at_paths<B: Backend, M: Module<B>>(
    module: &M,
    paths: &BTreeSet<String>,
) -> Result<BTreeMap<String, HostTensor>> {
    let out = collect(module, Some(paths))?;
    if let Some(missing) = paths.iter().find(|p| !out.contains_key(*p)) {
        return Err(Error::Other(format!(
            "the model has no parameter {missing}"
        )));
    }
    Ok(out)
}

fn collect<B: Backend, M: Module<B>>(
    module: &M,
    only: Option<&BTreeSet<String>>,
) -> Result<BTreeMap<String, HostTensor>> {
    let mut c = Collect {
        path: Vec::new(),
        only,
        out: BTreeMap::new(),
        error: None,
    };
    module.visit(&mut c);
    match c.error {
        Some(e) => Err(Error::Other(e)),
        None => Ok(c.out),
    }
}

struct Load<'a> {
    path: Vec<String>,
    values: &'a BTreeMap<String, HostTensor>,
    loaded: usize,
    error: Option<String>,
}

impl<B: Backend> ModuleMapper<B> for Load<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let key = self.path.join(".");
        let Some(v) = self.values.get(&key) else {
            return param;
        };
        let trainable = param.is_require_grad();
        let (id, tensor, mapper) = param.consume();
        if v.shape != tensor.dims().to_vec() {
            self.error.get_or_insert(format!(
                "parameter {key}: saved shape {:?}, model shape {:?}",
                v.shape,
                tensor.dims()
            ));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let data = TensorData::new(v.values.clone(), tensor.shape()).convert_dtype(tensor.dtype());
        let mut t = Tensor::from_data(data, (&tensor.device(), tensor.dtype()));
        if trainable {
            t = t.require_grad();
        }
        self.loaded += 1;
        Param::from_mapped_value(id, t, mapper)
    }
}

/// Replaces the parameters at the saved values' paths (keeping whether each is trainable).
/// Errors (naming the parameter) on a shape mismatch or a saved value the model has no
/// parameter for. Callers that need every trainable parameter covered check
/// [`trainable_paths`] against the values first.
pub fn load_trainable<B: Backend, M: Module<B>>(
    module: M,
    values: &BTreeMap<String, HostTensor>,
) -> Result<M> {
    let mut l = Load {
        path: Vec::new(),
        values,
        loaded: 0,
        error: None,
    };
    let module = module.map(&mut l);
    if let Some(e) = l.error {
        return Err(Error::Other(format!("loading trainable parameters: {e}")));
    }
    if l.loaded != values.len() {
        let have = trainable::<B, M>(&module)?;
        let extra: Vec<_> = values.keys().filter(|k| !have.contains_key(*k)).collect();
        return Err(Error::Other(format!(
            "loading trainable parameters: saved values for parameters the model does not have: {extra:?}"
        )));
    }
    Ok(module)
}

struct StableIds {
    path: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for StableIds {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if !param.is_require_grad() {
            return param;
        }
        let (_, tensor, mapper) = param.consume();
        let id = ParamId::from(stable_hash(0x7061_7261_6d73, &self.path.join(".")));
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// Gives every trainable parameter an id derived from its path (stable across processes).
pub fn stable_ids<B: Backend, M: Module<B>>(module: M) -> M {
    module.map(&mut StableIds { path: Vec::new() })
}

struct Bytes {
    trainable: u64,
    frozen: u64,
}

impl<B: Backend> ModuleVisitor<B> for Bytes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let bytes = (t.shape().num_elements() * t.dtype().size()) as u64;
        if param.is_require_grad() {
            self.trainable += bytes;
        } else {
            self.frozen += bytes;
        }
    }
}

/// Bytes of the module's float parameters that require a gradient, and of the others (read
/// from shapes and float types; nothing is copied).
pub fn param_bytes<B: Backend, M: Module<B>>(module: &M) -> (u64, u64) {
    let mut v = Bytes {
        trainable: 0,
        frozen: 0,
    };
    module.visit(&mut v);
    (v.trainable, v.frozen)
}
