//! `#[solid]`: turns a plain Rust function into a solidflow solid.
//!
//! ```text
//! /// Sums the numbers.
//! #[solid(config = SumConfig, resources(GPU = 1), tags(team = "data"), retry(max_retries = 2, delay = 0.5))]
//! fn total(ctx: &SolidContext, numbers: Vec<i64>) -> Result<i64, SolidError> { ... }
//!
//! #[solid(outputs(evens: Vec<i64>, odds: Vec<i64>))]
//! fn split(ctx: &SolidContext, numbers: Vec<i64>) -> (Vec<i64>, Vec<i64>) { ... }
//! ```
//!
//! The function `total` becomes a function `total()` returning the unit struct
//! `TotalSolid`, which implements `solidflow::definition::solid::Solid`, so pipelines
//! wire it with type-checked handles (`p.invoke(total, (numbers,))`); the original body
//! stays callable as `TotalSolid::compute(ctx, ...)`. (A function rather than a unit
//! struct named `total`, so that an input may share its name with an upstream solid.)
//! The first parameter is the context; every other parameter is an input (by value, which
//! needs `Clone` when a value feeds several steps, or by reference). The return type is
//! the output (`result`), a tuple matching `outputs(...)`, either of these wrapped in
//! `Result<_, E>` where `E` is `SolidError` or any `std::error::Error`, or nothing.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, FnArg, Ident, ItemFn, LitStr, Pat, ReturnType, Token, Type, parse_macro_input};

/// Defines a solid from a function. See the crate docs for the accepted forms.
#[proc_macro_attribute]
pub fn solid(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = parse_macro_input!(attr as SolidArgs);
    let func = parse_macro_input!(item as ItemFn);
    expand(args, func)
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

#[derive(Default)]
struct SolidArgs {
    name: Option<LitStr>,
    description: Option<LitStr>,
    config: Option<Type>,
    outputs: Option<Vec<(Ident, Type)>>,
    resources: Vec<(String, Expr)>,
    tags: Vec<(String, Expr)>,
    retry: Option<Vec<(String, Expr)>>,
}

struct KeyValue(String, Expr);

impl Parse for KeyValue {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let key = if input.peek(LitStr) {
            input.parse::<LitStr>()?.value()
        } else {
            input.parse::<Ident>()?.to_string()
        };
        input.parse::<Token![=]>()?;
        Ok(Self(key, input.parse()?))
    }
}

struct NamedType(Ident, Type);

impl Parse for NamedType {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let name = input.parse()?;
        input.parse::<Token![:]>()?;
        Ok(Self(name, input.parse()?))
    }
}

impl Parse for SolidArgs {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut args = SolidArgs::default();
        while !input.is_empty() {
            let key: Ident = input.parse()?;
            match key.to_string().as_str() {
                "name" => {
                    input.parse::<Token![=]>()?;
                    args.name = Some(input.parse()?);
                }
                "description" => {
                    input.parse::<Token![=]>()?;
                    args.description = Some(input.parse()?);
                }
                "config" => {
                    input.parse::<Token![=]>()?;
                    args.config = Some(input.parse()?);
                }
                "outputs" => {
                    let content;
                    syn::parenthesized!(content in input);
                    let items = Punctuated::<NamedType, Token![,]>::parse_terminated(&content)?;
                    args.outputs = Some(items.into_iter().map(|NamedType(n, t)| (n, t)).collect());
                }
                "resources" | "required_resources" | "tags" | "retry" => {
                    let content;
                    syn::parenthesized!(content in input);
                    let items: Vec<(String, Expr)> =
                        Punctuated::<KeyValue, Token![,]>::parse_terminated(&content)?
                            .into_iter()
                            .map(|KeyValue(k, v)| (k, v))
                            .collect();
                    match key.to_string().as_str() {
                        "tags" => args.tags = items,
                        "retry" => args.retry = Some(items),
                        _ => args.resources = items,
                    }
                }
                other => {
                    return Err(syn::Error::new(
                        key.span(),
                        format!(
                            "unknown #[solid] option `{other}`; expected name, description, config, outputs(..), resources(..), tags(..) or retry(..)"
                        ),
                    ));
                }
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(args)
    }
}

fn is_result(ty: &Type) -> Option<&Type> {
    generic_of(ty, "Result")
}

/// The first type argument of `ty` when it is spelled `<path>::Name<T, ..>`.
fn generic_of<'a>(ty: &'a Type, name: &str) -> Option<&'a Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != name {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        syn::GenericArgument::Type(t) => Some(t),
        _ => None,
    }
}

/// The item type `T` of an output spelled `DynamicOutput<T>` (any path ending so).
fn dynamic_item(ty: &Type) -> Option<&Type> {
    generic_of(ty, "DynamicOutput")
}

/// The handle type of an output of type `ty` and the expression that builds it.
fn output_handle(ty: &Type, name: &str) -> (TokenStream2, TokenStream2) {
    match dynamic_item(ty) {
        Some(item) => (
            quote! { ::solidflow::__private::DynamicHandle<#item> },
            quote! { ::solidflow::__private::DynamicHandle::output(__alias, #name) },
        ),
        None => (
            quote! { ::solidflow::__private::Handle<#ty> },
            quote! { ::solidflow::__private::Handle::output(__alias, #name) },
        ),
    }
}

fn expand(args: SolidArgs, func: ItemFn) -> syn::Result<TokenStream2> {
    let vis = &func.vis;
    let ident = &func.sig.ident;
    let name = args
        .name
        .as_ref()
        .map(LitStr::value)
        .unwrap_or_else(|| ident.to_string());
    let description = args
        .description
        .as_ref()
        .map(LitStr::value)
        .unwrap_or_else(|| doc_text(&func.attrs));
    // The first parameter must be the context. If it is not, report that once and
    // generate the solid as if every parameter were an input, so call sites still
    // type-check against what the user wrote and show no follow-on errors.
    let first_is_context = func.sig.inputs.first().is_some_and(is_context);
    let context_error = (!first_is_context).then(|| {
        let message = match func.sig.inputs.first() {
            None => format!(
                "a solid takes the context as its first parameter: `fn {ident}(ctx: &SolidContext, ...)`"
            ),
            Some(first) => format!(
                "the first parameter of solid `{ident}` must be the context `ctx: &SolidContext`, found `{}`; add `ctx: &SolidContext` before the inputs (`_ctx` if unused)",
                quote!(#first).to_string().replace(" :", ":").replace("& ", "&")
            ),
        };
        match func.sig.inputs.first() {
            Some(first) => syn::Error::new_spanned(first, message),
            None => syn::Error::new_spanned(&func.sig, message),
        }
        .to_compile_error()
    });
    let mut params = func.sig.inputs.iter();
    if first_is_context {
        params.next();
    }
    // Inputs: (name, value type, by reference?)
    let mut inputs = Vec::new();
    for p in params {
        let FnArg::Typed(pt) = p else {
            return Err(syn::Error::new_spanned(p, "solids cannot take self"));
        };
        let Pat::Ident(pi) = &*pt.pat else {
            return Err(syn::Error::new_spanned(
                &pt.pat,
                "solid inputs must be plain names",
            ));
        };
        let (ty, by_ref) = match &*pt.ty {
            Type::Reference(r) => ((*r.elem).clone(), true),
            t => (t.clone(), false),
        };
        inputs.push((pi.ident.clone(), ty, by_ref));
    }
    let (ret_ty, fallible) = match &func.sig.output {
        ReturnType::Default => (None, false),
        ReturnType::Type(_, t) => match is_result(t) {
            Some(ok) => (Some(ok.clone()), true),
            None => (Some((**t).clone()), false),
        },
    };
    let ret_ty = ret_ty.filter(|t| !matches!(t, Type::Tuple(tt) if tt.elems.is_empty()));
    // Outputs: (name, type)
    let outputs: Vec<(Ident, Type)> = match (&args.outputs, &ret_ty) {
        (Some(outs), _) => outs.clone(),
        (None, Some(t)) => vec![(format_ident!("result"), t.clone())],
        (None, None) => vec![],
    };

    let input_names: Vec<String> = inputs.iter().map(|(n, _, _)| n.to_string()).collect();
    let input_tys: Vec<&Type> = inputs.iter().map(|(_, t, _)| t).collect();
    let takes = inputs.iter().filter(|(_, _, r)| !r).map(|(n, t, _)| {
        let s = n.to_string();
        quote! { let #n: #t = __inputs.take::<#t>(#s)?; }
    });
    let gets = inputs.iter().filter(|(_, _, r)| *r).map(|(n, t, _)| {
        let s = n.to_string();
        quote! { let #n: &#t = __inputs.get::<#t>(#s)?; }
    });
    let call_args = inputs.iter().map(|(n, _, _)| n);
    let struct_ident = format_ident!("{}Solid", camel_case(&ident.to_string()));
    let ctx_arg = first_is_context.then(|| quote! { __ctx, });
    let call = if fallible {
        quote! { #struct_ident::compute(#ctx_arg #(#call_args),*).map_err(::solidflow::__private::SolidError::from)? }
    } else {
        quote! { #struct_ident::compute(#ctx_arg #(#call_args),*) }
    };
    let collect_outputs = match outputs.len() {
        0 => quote! { let _ = __ret; ::solidflow::__private::Outputs::new() },
        1 if args.outputs.is_none() => {
            quote! { ::solidflow::__private::Outputs::new().with("result", __ret) }
        }
        1 => {
            let n = outputs[0].0.to_string();
            quote! { ::solidflow::__private::Outputs::new().with(#n, __ret) }
        }
        _ => {
            let vars: Vec<Ident> = (0..outputs.len())
                .map(|i| format_ident!("__o{i}"))
                .collect();
            let names = outputs.iter().map(|(n, _)| n.to_string());
            quote! {
                let (#(#vars),*) = __ret;
                ::solidflow::__private::Outputs::new() #(.with(#names, #vars))*
            }
        }
    };
    let output_defs = outputs.iter().map(|(n, t)| {
        let s = n.to_string();
        match dynamic_item(t) {
            Some(item) => quote! { .dynamic_output::<#item>(#s) },
            None => quote! { .output(#s, ::solidflow::__private::TypeInfo::of::<#t>()) },
        }
    });
    let input_defs = inputs.iter().map(|(n, t, _)| {
        let s = n.to_string();
        quote! { .input(#s, ::solidflow::__private::TypeInfo::of::<#t>()) }
    });
    let config = args
        .config
        .as_ref()
        .map(|c| quote! { .config_schema(::solidflow::__private::config_type_of::<#c>()) });
    let config_ty = match &args.config {
        Some(c) => quote! { #c },
        None => quote! { ::solidflow::__private::NoConfig },
    };
    let resources = args
        .resources
        .iter()
        .map(|(k, v)| quote! { .requires(#k, (#v) as f64) });
    let tags = args.tags.iter().map(|(k, v)| quote! { .tag(#k, #v) });
    let retry = match &args.retry {
        None => None,
        Some(items) => {
            let mut setters = Vec::new();
            for (k, v) in items {
                let setter = match k.as_str() {
                    "max_retries" => quote! { __p.max_retries = (#v) as u32; },
                    "delay" => quote! { __p.delay = (#v) as f64; },
                    "backoff" => quote! { __p.backoff = (#v) as f64; },
                    "jitter" => quote! { __p.jitter = (#v) as f64; },
                    other => {
                        return Err(syn::Error::new_spanned(
                            v,
                            format!(
                                "unknown retry option `{other}`; expected max_retries, delay, backoff, jitter"
                            ),
                        ));
                    }
                };
                setters.push(setter);
            }
            Some(
                quote! { .retry({ let mut __p = ::solidflow::__private::RetryPolicy::default(); #(#setters)* __p }) },
            )
        }
    };
    let handle_tys = input_tys
        .iter()
        .map(|t| quote! { ::solidflow::__private::Handle<#t> });
    let wire_items = (0..inputs.len()).map(|i| {
        let idx = syn::Index::from(i);
        let n = &input_names[i];
        quote! { (#n, __inputs.#idx.raw()) }
    });
    let generic_args: Vec<Ident> = (0..inputs.len()).map(|i| format_ident!("__A{i}")).collect();
    let into_handles = (0..inputs.len()).map(|i| {
        let idx = syn::Index::from(i);
        quote! { ::solidflow::__private::IntoHandle::into_handle(self.#idx) }
    });
    let into_inputs = quote! {
        impl<#(#generic_args: ::solidflow::__private::IntoHandle<#input_tys>),*>
            ::solidflow::__private::IntoInputs<#struct_ident> for (#(#generic_args,)*)
        {
            #[allow(clippy::unused_unit)]
            fn into_inputs(self) -> <#struct_ident as ::solidflow::__private::Solid>::Inputs {
                let _ = &self;
                (#(#into_handles,)*)
            }
        }
    };
    let outputs_struct_ident = format_ident!("{}_outputs", ident);
    let (outputs_ty, outputs_value, outputs_struct) = match outputs.len() {
        0 => (quote! { () }, quote! { () }, quote! {}),
        1 if args.outputs.is_none() => {
            let (ty, value) = output_handle(&outputs[0].1, "result");
            (ty, value, quote! {})
        }
        _ => {
            let fields = outputs.iter().map(|(n, t)| {
                let (ty, _) = output_handle(t, &n.to_string());
                quote! { pub #n: #ty }
            });
            let inits = outputs.iter().map(|(n, t)| {
                let (_, value) = output_handle(t, &n.to_string());
                quote! { #n: #value }
            });
            let doc = format!("Typed handles to the outputs of solid `{name}`.");
            (
                quote! { #outputs_struct_ident },
                quote! { #outputs_struct_ident { #(#inits),* } },
                quote! {
                    #[doc = #doc]
                    #[allow(non_camel_case_types)]
                    #vis struct #outputs_struct_ident { #(#fields),* }
                },
            )
        }
    };
    let attrs = func.attrs.iter().filter(|a| a.path().is_ident("doc"));
    let compute_sig = {
        let mut sig = func.sig.clone();
        sig.ident = format_ident!("compute");
        sig
    };
    let body = &func.block;
    let mut_inputs = if inputs.iter().any(|(_, _, r)| !r) {
        quote! { mut }
    } else {
        quote! {}
    };
    let struct_doc = format!(
        "The solid `{name}`; created by the function `{ident}()` that `#[solid]` generates."
    );
    Ok(quote! {
        #context_error

        #into_inputs

        #[doc = #struct_doc]
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #struct_ident;

        #(#attrs)*
        ///
        /// (A solid: pass this function to `PipelineBuilder::invoke`.)
        #vis fn #ident() -> #struct_ident {
            #struct_ident
        }

        #outputs_struct

        impl #struct_ident {
            /// The solid's body, callable directly (e.g. in unit tests).
            #[allow(clippy::too_many_arguments, clippy::ptr_arg)]
            #vis #compute_sig #body
        }

        impl ::solidflow::__private::Solid for #struct_ident {
            type Inputs = (#(#handle_tys,)*);
            type Outputs = #outputs_ty;
            type Config = #config_ty;

            fn definition() -> ::solidflow::__private::SolidDefinition {
                ::solidflow::__private::SolidDefinition::new(#name, |__ctx: &::solidflow::__private::SolidContext<'_>, #mut_inputs __inputs: ::solidflow::__private::Inputs| {
                    #(#takes)*
                    #(#gets)*
                    #[allow(clippy::let_unit_value)]
                    let __ret = #call;
                    Ok({ #collect_outputs })
                })
                .description(#description)
                #(#input_defs)*
                #(#output_defs)*
                #config
                #(#resources)*
                #(#tags)*
                #retry
            }

            fn wire(__inputs: Self::Inputs) -> Vec<(&'static str, ::solidflow::__private::RawHandle)> {
                let _ = &__inputs;
                vec![#(#wire_items),*]
            }

            fn outputs(__alias: &str) -> Self::Outputs {
                let _ = __alias;
                #outputs_value
            }
        }
    })
}

/// Whether `param` is `name: &SolidContext` (any path ending in `SolidContext`).
fn is_context(param: &FnArg) -> bool {
    let FnArg::Typed(pt) = param else {
        return false;
    };
    let Type::Reference(r) = &*pt.ty else {
        return false;
    };
    matches!(&*r.elem, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "SolidContext"))
}

fn camel_case(snake: &str) -> String {
    snake
        .split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

fn doc_text(attrs: &[syn::Attribute]) -> String {
    let lines: Vec<String> = attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .filter_map(|a| match &a.meta {
            syn::Meta::NameValue(nv) => match &nv.value {
                Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) => Some(s.value().trim().to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    lines.join("\n").trim().to_string()
}
